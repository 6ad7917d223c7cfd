"""Stage 2's training loss: the competition-weighted vertebra BCE plus the per-slice BCE on known slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsna_cspine.constants import VERTEBRA_WEIGHTS


def fracture_loss(
    logit: torch.Tensor,
    label: torch.Tensor,
    slice_logits: torch.Tensor | None = None,
    slice_labels: torch.Tensor | None = None,
    slice_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Competition-weighted vertebra BCE plus an optional per-slice BCE on known slices.

    Positives weigh ``VERTEBRA_WEIGHTS[1]`` (2) and negatives ``VERTEBRA_WEIGHTS[0]`` (1), normalised by the
    weight sum as the metric does.

    Args:
        logit: ``(B,)`` vertebra logits.
        label: ``(B,)`` 0/1 targets.
        slice_logits: ``(B, N)`` or None.
        slice_labels: ``(B, N)`` in {-1, 0, 1}; -1 entries are ignored.
        slice_weight: multiplier of the slice term.

    Returns:
        ``(total, vertebra_term)``.
    """
    neg_w, pos_w = VERTEBRA_WEIGHTS
    label = label.float()
    weights = label * pos_w + (1.0 - label) * neg_w
    per_item = F.binary_cross_entropy_with_logits(logit.float(), label, reduction="none")
    vertebra = (per_item * weights).sum() / weights.sum()
    total = vertebra
    if slice_weight > 0 and slice_logits is not None and slice_labels is not None:
        known = slice_labels >= 0
        if known.any():
            slice_term = F.binary_cross_entropy_with_logits(slice_logits.float()[known], slice_labels[known].float())
            total = total + slice_weight * slice_term
    return total, vertebra

"""Compare a predicted vertebra mask with the truth: Dice and slice-range error per vertebra."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import DiceMetric
from scipy import ndimage

from rsna_cspine.constants import CERVICAL_LABELS, VERTEBRAE


def _as_label_tensor(mask: np.ndarray) -> torch.Tensor:
    """A ``(z, y, x)`` label map as the ``(1, 1, z, y, x)`` integer tensor MONAI's metrics take (no copy for
    the usual uint8/int16/int32/int64 maps)."""
    mask = np.ascontiguousarray(mask)
    if mask.dtype not in (np.uint8, np.int16, np.int32, np.int64):
        mask = mask.astype(np.int64)
    return torch.from_numpy(mask)[None, None]


def evaluate_segmentation(pred_mask: np.ndarray, true_mask: np.ndarray) -> dict[str, dict[str, float] | float]:
    """Dice and slice-range agreement of C1..C7 between two ``(z, y, x)`` label maps of one study.

    Labels other than 1..7 (e.g. thoracic 8..19 in the truth) count as background.

    Args:
        pred_mask: predicted labels.
        true_mask: reference labels (same shape).

    Returns:
        ``dice`` {vertebra: Dice} (NaN if absent from both, 0 if in only one), ``dice_mean`` over the
        vertebrae present in the truth, ``z_error`` {vertebra: max(|Δz_min|, |Δz_max|) in slices}
        (NaN if absent from the truth, inf if present in the truth but not predicted), ``found``
        {vertebra: 1.0/0.0} for vertebrae present in the truth.
    """
    if pred_mask.shape != true_mask.shape:
        raise ValueError(f"shapes differ: predicted {pred_mask.shape} vs truth {true_mask.shape}")
    # Label maps with num_classes: MONAI compares one class at a time, never one-hot copies of the study.
    # Classes above C7 are never compared, so thoracic labels count as background. With ignore_empty=False
    # a vertebra predicted but absent from the truth scores 0; one absent from both is reported as NaN below.
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False,
                        num_classes=max(CERVICAL_LABELS) + 1)
    scores = metric(_as_label_tensor(pred_mask), _as_label_tensor(true_mask))[0].tolist()
    pred_boxes = ndimage.find_objects(np.asarray(pred_mask), max_label=max(CERVICAL_LABELS))
    true_boxes = ndimage.find_objects(np.asarray(true_mask), max_label=max(CERVICAL_LABELS))
    dice: dict[str, float] = {}
    z_error: dict[str, float] = {}
    found: dict[str, float] = {}
    for label, name, score in zip(CERVICAL_LABELS, VERTEBRAE, scores):
        true_box, pred_box = true_boxes[label - 1], pred_boxes[label - 1]
        dice[name] = math.nan if true_box is None and pred_box is None else float(score)
        if true_box is None:
            z_error[name] = math.nan
            continue
        found[name] = float(pred_box is not None)
        if pred_box is None:
            z_error[name] = math.inf
        else:
            z_error[name] = float(
                max(abs(pred_box[0].start - true_box[0].start), abs(pred_box[0].stop - true_box[0].stop))
            )
    present = [dice[name] for name in VERTEBRAE if not math.isnan(z_error[name])]
    return {
        "dice": dice,
        "dice_mean": float(np.mean(present)) if present else math.nan,
        "z_error": z_error,
        "found": found,
    }

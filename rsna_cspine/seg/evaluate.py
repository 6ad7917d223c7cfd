"""Compare a predicted vertebra mask with the truth: Dice and slice-range error per vertebra."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from rsna_cspine.constants import CERVICAL_LABELS, VERTEBRAE


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
    n = len(CERVICAL_LABELS) + 1
    pred = np.where(pred_mask <= max(CERVICAL_LABELS), pred_mask, 0).astype(np.int64)
    true = np.where(true_mask <= max(CERVICAL_LABELS), true_mask, 0).astype(np.int64)
    # One pass: the joint histogram of (true, pred) labels is the confusion matrix.
    confusion = np.bincount((true * n + pred).ravel(), minlength=n * n).reshape(n, n)
    pred_boxes = ndimage.find_objects(pred, max_label=n - 1)
    true_boxes = ndimage.find_objects(true, max_label=n - 1)
    dice: dict[str, float] = {}
    z_error: dict[str, float] = {}
    found: dict[str, float] = {}
    for label, name in zip(CERVICAL_LABELS, VERTEBRAE):
        tp = confusion[label, label]
        total = confusion[label, :].sum() + confusion[:, label].sum()
        dice[name] = float(2.0 * tp / total) if total else math.nan
        true_box, pred_box = true_boxes[label - 1], pred_boxes[label - 1]
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

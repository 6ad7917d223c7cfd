"""What ``rsna-cspine demo`` hands back and prints: :class:`DemoResult`, its JSON form and the closing summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rsna_cspine.report.heldout import HeldoutScores


@dataclass
class DemoResult:
    """Where the demo's artefacts are and how well it did.

    Attributes:
        out_dir: the demo folder.
        submission: the submission of the held-out test studies.
        timings: the per-study timing log of the prediction.
        cv_report: ``report.md`` of the stage-2 out-of-fold predictions.
        pictures: the PNG files (CV report plots, training curves).
        models_dir: the models folder used for prediction.
        score: competition score (study form) of the submission on the held-out labels.
        prior_score: the same score of the prior (training prevalence) submission.
        heldout: every held-out figure (pooled per-vertebra AUC, sensitivity, specificity, scores).
        detection_picture: Grad-CAM of the most confident detected fracture beside a cleared vertebra
            (None when no fractured test vertebra reached the threshold or the picture failed).
        seg_dice: best validation mean Dice of stage 1 (NaN when unknown).
        cv_score: stage-2 out-of-fold competition score (study form).
        n_test: held-out test studies.
        seconds: wall-clock time of each step and ``total``.
    """

    out_dir: Path
    submission: Path
    timings: Path
    cv_report: Path
    pictures: list[Path]
    models_dir: Path
    score: float
    prior_score: float
    heldout: HeldoutScores
    detection_picture: Path | None
    seg_dice: float
    cv_score: float
    n_test: int
    seconds: dict[str, float]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not np.isfinite(value) else value


def as_json(result: DemoResult) -> dict[str, Any]:
    """``demo_summary.json``'s content: paths as strings, NaN as null.

    Args:
        result: what ``run_demo`` returned.
    """
    out: dict[str, Any] = {}
    for key, value in vars(result).items():
        if key == "heldout":
            value = {k: _finite(v) for k, v in value.to_dict().items()}
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = [str(v) for v in value]
        elif isinstance(value, float) and not np.isfinite(value):
            value = None
        out[key] = value
    return out


def format_summary(result: DemoResult) -> str:
    """The closing summary printed by ``rsna-cspine demo``.

    Args:
        result: what ``run_demo`` returned.
    """
    h = result.heldout
    lines = [
        "",
        "=== demo finished in {:.1f} min ({})".format(
            result.seconds["total"] / 60, ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items() if k != "total")
        ),
        f"held-out test set: {h.n_studies} studies, {h.n_vertebrae} vertebrae ({h.n_fractured} fractured), "
        "predicted through the whole pipeline (stage-1 masks → crops → stage 2)",
        f"  per-vertebra ROC AUC:  {h.auc:.3f} (95 % interval over another draw of {h.n_studies} studies: "
        f"{h.auc_low:.3f}–{h.auc_high:.3f})",
        f"  sensitivity at p >= {h.threshold:g}: {h.sensitivity:.3f}",
        f"  specificity at p >= {h.threshold:g}: {h.specificity:.3f}",
        f"  competition score (weighted log loss, lower is better): model {h.score:.4f} vs prior "
        f"{h.prior_score:.4f} ("
        + (f"{h.below_prior:.1%} below the prior)" if h.below_prior >= 0 else f"{-h.below_prior:.1%} above the prior: worse)"),
        f"stage 1 best validation Dice: {result.seg_dice:.3f}; stage 2 out-of-fold score: {result.cv_score:.4f}",
        "detected fracture beside a cleared vertebra (Grad-CAM): "
        + (str(result.detection_picture) if result.detection_picture else "not drawn (see the log)"),
        f"submission:   {result.submission}",
        f"timings:      {result.timings}",
        f"CV report:    {result.cv_report}",
        f"models:       {result.models_dir}",
        "pictures:",
        *(f"  {p}" for p in result.pictures),
    ]
    return "\n".join(lines)

"""What ``rsna-cspine demo`` hands back and prints: :class:`DemoResult`, its JSON form and the closing summary."""

from __future__ import annotations

import math
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
        stage2_epochs: epochs stage 2 trained within its share of the budget.
        advice: what to do when the machine was too slow for the budget (empty otherwise).
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
    stage2_epochs: int = 0
    advice: str = ""


def slow_machine_advice(epochs: int, epoch_s: float, minutes: float, seg_share: float, min_epochs: int) -> str:
    """The closing warning of a demo whose stage 2 trained fewer than ``min_epochs`` epochs, with the
    ``--minutes`` that would have given it that many; empty when it trained enough.

    The fixed work (data, caches, prediction) takes what it takes, so on a CPU half as fast the training
    budget shrinks by more than half and the figures fall (evidence.md, "The demo on a slower CPU"). Extra
    minutes are shared as the budget is: stage 1 takes ``seg_share`` of them. A fifth more on top: with a better
    stage 1 more vertebrae pass its check, so validation and predict take longer (a 2-core AMD EPYC given the
    15 minutes this said for 10 epochs without the fifth trained 8).

    Args:
        epochs: stage-2 epochs trained.
        epoch_s: mean seconds per stage-2 epoch.
        minutes: the demo's budget.
        seg_share: stage 1's share of the training time.
        min_epochs: fewest stage-2 epochs the demo's settings expect (the README's runs trained 7-15).
    """
    if epochs >= min_epochs or not epoch_s > 0:
        return ""
    extra_s = 1.2 * (min_epochs - epochs) * epoch_s / (1.0 - seg_share)
    suggested = math.ceil(minutes + extra_s / 60.0)
    return (f"this machine left stage 2 time for {epochs} epoch(s) of {epoch_s:.0f} s, fewer than the {min_epochs} the "
            f"demo's settings expect (min_stage2_epochs, configs/demo.yaml), so these figures are lower than the "
            f"README's. For them here, give it more time: rsna-cspine demo --minutes {suggested}")


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
    if result.advice:
        lines += ["", f"NOTE: {result.advice}"]
    return "\n".join(lines)

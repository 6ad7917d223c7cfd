"""How well a submission tells fractured vertebrae apart on held-out studies with known labels.

The demo and ``benchmarks/demo_crosscheck.py`` score their submissions here: pooled per-vertebra ROC AUC,
sensitivity and specificity at a probability threshold, and the competition score beside the prior's,
plus one picture that shows the detection itself (Grad-CAM of the most confident true positive beside a
correctly cleared vertebra, both drawn by ``explain``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import LayoutError
from rsna_cspine.metric import competition_score, labels_to_solution, predictions_to_submission

logger = logging.getLogger(__name__)


@dataclass
class HeldoutScores:
    """Held-out figures of one submission.

    Attributes:
        auc: pooled ROC AUC over every vertebra C1–C7 of the scored studies (NaN with one class only).
        sensitivity: share of fractured vertebrae with probability ≥ ``threshold``.
        specificity: share of intact vertebrae with probability < ``threshold``.
        threshold: the probability that counts as "fractured".
        score: competition score (study form) of the submission.
        prior_score: the same score of the prior (training prevalence) for every study.
        n_studies: scored studies.
        n_vertebrae: scored vertebrae (7 per study).
        n_fractured: fractured vertebrae among them.
        auc_low: lower end of the pooled AUC's 95 % interval over studies (:func:`pooled_auc_interval`).
        auc_high: its upper end.
    """

    auc: float
    sensitivity: float
    specificity: float
    threshold: float
    score: float
    prior_score: float
    n_studies: int
    n_vertebrae: int
    n_fractured: int
    auc_low: float = float("nan")
    auc_high: float = float("nan")

    @property
    def below_prior(self) -> float:
        """How far the score is below the prior's (0.2 = 20 % lower, i.e. better)."""
        return 1.0 - self.score / self.prior_score if self.prior_score > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "below_prior": self.below_prior}


def vertebra_table(submission: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, vertebra) of ``labels``: its label and the submission's probability.

    Args:
        submission: ``row_id, fractured`` rows (``<uid>_C1`` ...).
        labels: train.csv-like labels of the studies to score.

    Raises:
        LayoutError: a labelled vertebra has no row in the submission.
    """
    probs = submission.set_index(submission["row_id"].astype(str))["fractured"]
    rows = [
        {"StudyInstanceUID": str(uid), "vertebra": v, "label": int(label), "row_id": f"{uid}_{v}"}
        for uid, values in zip(labels["StudyInstanceUID"], labels[list(VERTEBRAE)].to_numpy())
        for v, label in zip(VERTEBRAE, values)
    ]
    table = pd.DataFrame(rows, columns=["StudyInstanceUID", "vertebra", "label", "row_id"])
    missing = table.loc[~table["row_id"].isin(probs.index), "row_id"]
    if len(missing):
        raise LayoutError(f"the submission has no row for {len(missing)} labelled vertebrae, e.g. {missing.iloc[0]}")
    table["probability"] = probs.reindex(table["row_id"]).to_numpy(np.float64)
    return table.drop(columns="row_id")


#: Bootstrap draws of :func:`pooled_auc_interval`. At 1000 the ends move by up to ~0.01 between resampling seeds
#: (six seeds on two 36- and 40-study sets, evidence.md, "Which studies were drawn"): finer than the figures.
AUC_BOOTSTRAP_DRAWS = 1000


def pooled_auc_interval(
    studies: np.ndarray, labels: np.ndarray, probs: np.ndarray, draws: int = AUC_BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of the pooled AUC when the scored studies are drawn again (with replacement).

    Studies, not vertebrae, are resampled: a study's seven vertebrae share its anatomy and image quality, and
    its set of fractured levels. With a few dozen studies the interval is wide; it says how far another draw
    of as many studies from the same generator may land. Written here because ``scipy.stats.bootstrap``
    resamples single observations, not groups of rows.

    Args:
        studies: ``(n,)`` the study of each vertebra row.
        labels: ``(n,)`` 0/1 truth.
        probs: ``(n,)`` probabilities.
        draws: bootstrap resamples (those with one class only are skipped).
        seed: the resampling stream (fixed: the same submission always gets the same interval).

    Returns:
        ``(low, high)``; NaN when fewer than two studies or no draw has both classes.
    """
    uids, row_study = np.unique(np.asarray(studies, dtype=str), return_inverse=True)
    if len(uids) < 2:
        return float("nan"), float("nan")
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    rows_of = [np.flatnonzero(row_study == k) for k in range(len(uids))]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(draws):
        rows = np.concatenate([rows_of[k] for k in rng.integers(len(uids), size=len(uids))])
        if 0 < y[rows].sum() < len(rows):
            aucs.append(roc_auc_score(y[rows], p[rows]))
    if not aucs:
        return float("nan"), float("nan")
    low, high = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(high)


def score_heldout(
    submission: pd.DataFrame, labels: pd.DataFrame, prior: np.ndarray, threshold: float = 0.5
) -> HeldoutScores:
    """Score a submission on held-out labels, next to the prior.

    Args:
        submission: ``row_id, fractured`` for (at least) the studies of ``labels``.
        labels: the held-out studies' true labels (``StudyInstanceUID, patient_overall, C1..C7``).
        prior: ``(8,)`` training prevalence, the baseline submission.
        threshold: probability at or above which a vertebra counts as detected.
    """
    table = vertebra_table(submission, labels)
    y, p = table["label"].to_numpy(), table["probability"].to_numpy()
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[0, 1]).ravel()
    solution = labels_to_solution(labels)
    scored = submission[submission["row_id"].astype(str).isin(set(solution["row_id"]))]
    prior_table = pd.DataFrame(np.tile(np.asarray(prior, np.float64), (len(labels), 1)), columns=list(TARGET_COLUMNS))
    prior_table.insert(0, "StudyInstanceUID", labels["StudyInstanceUID"].astype(str).to_numpy())
    prior_rows = predictions_to_submission(prior_table)
    two_classes = 0 < y.sum() < len(y)
    low, high = pooled_auc_interval(table["StudyInstanceUID"].to_numpy(), y, p) if two_classes else (float("nan"),) * 2
    return HeldoutScores(
        auc=float(roc_auc_score(y, p)) if two_classes else float("nan"),
        sensitivity=float(tp / (tp + fn)) if tp + fn else float("nan"),
        specificity=float(tn / (tn + fp)) if tn + fp else float("nan"),
        threshold=float(threshold),
        score=float(competition_score(solution, scored)),
        prior_score=float(competition_score(solution, prior_rows)),
        n_studies=int(len(labels)),
        n_vertebrae=int(len(table)),
        n_fractured=int(y.sum()),
        auc_low=low,
        auc_high=high,
    )


def example_candidates(table: pd.DataFrame, threshold: float = 0.5,
                       study: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Candidates for the detection picture, best first.

    Args:
        table: :func:`vertebra_table`.
        threshold: the detection threshold.
        study: the study of the detection shown; its intact vertebrae come first among the cleared ones
            (the same patient and scan: the two pictures then differ by the fracture).

    Returns:
        ``(detected, cleared)``: true positives by falling probability; intact vertebrae below the
        threshold by rising probability (``study``'s first).
    """
    hits = table[(table["label"] == 1) & (table["probability"] >= threshold)]
    clear = table[(table["label"] == 0) & (table["probability"] < threshold)]
    clear = clear.assign(_other=clear["StudyInstanceUID"] != study).sort_values(["_other", "probability"], kind="stable")
    return hits.sort_values("probability", ascending=False, kind="stable"), clear.drop(columns="_other")


def pick_examples(table: pd.DataFrame, threshold: float = 0.5) -> tuple[pd.Series | None, pd.Series | None]:
    """The most confident true positive and, beside it, the most confidently cleared intact vertebra
    (of the detected vertebra's study when it has one, else of any study).

    Args:
        table: :func:`vertebra_table`.
        threshold: the detection threshold.

    Returns:
        ``(detected, cleared)`` rows of ``table``; ``None`` where no vertebra qualifies.
    """
    hits, _ = example_candidates(table, threshold)
    detected = hits.iloc[0] if len(hits) else None
    _, clear = example_candidates(table, threshold, None if detected is None else str(detected["StudyInstanceUID"]))
    return detected, (clear.iloc[0] if len(clear) else None)


def draw_detection_picture(
    models_dir: str | Path, images_dir: str | Path, table: pd.DataFrame, out_dir: str | Path,
    threshold: float = 0.5, device: str = "auto", tries: int = 5,
) -> Path | None:
    """``explain``'s Grad-CAM picture of a detected fracture beside one of a correctly cleared vertebra.

    Both studies go through ``explain`` (the whole pipeline again: stage-1 mask, crops, classifier), so
    the pictures show what ``predict`` computed; their folders hold the other ``explain`` pictures too.
    A candidate without crops (stage 1 or its QC dropped the vertebra: its probability is the prior) has
    no Grad-CAM; the next candidate of :func:`example_candidates` is tried, up to ``tries`` of each kind.

    Args:
        models_dir: the models folder ``predict`` read.
        images_dir: the folder holding the studies (``test_images``).
        table: :func:`vertebra_table` of the scored studies.
        out_dir: where ``detection.png`` and the ``explain`` folders go.
        threshold: the detection threshold.
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        tries: candidates tried per kind.

    Returns:
        The path of ``detection.png``; None when no fractured vertebra with crops was found. When no
        fracture reached ``threshold``, the left panel is the fractured vertebra the model ranked highest,
        and its title says it stayed below the threshold.
    """
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    from rsna_cspine.inference import FracturePipeline, PipelineConfig
    from rsna_cspine.report.explain import StudyExplainer

    out_dir = Path(out_dir)
    explainer = StudyExplainer(FracturePipeline.from_models_dir(models_dir, PipelineConfig(device=device)))

    def first_drawn(candidates: pd.DataFrame, kind: str) -> tuple[pd.Series, Any, Path] | None:
        for _, row in candidates.head(tries).iterrows():
            uid, vertebra = str(row["StudyInstanceUID"]), str(row["vertebra"])
            explanation = explainer.explain(Path(images_dir) / uid, out_dir / f"{kind}_{uid}", vertebrae=[vertebra])
            picture = explanation.vertebrae[0].pictures.get("gradcam")
            if picture is not None:
                return row, explanation.vertebrae[0], picture
            logger.info("%s %s: no Grad-CAM (%s); trying the next candidate", uid, vertebra, explanation.vertebrae[0].missing)
        return None

    hits, _ = example_candidates(table, threshold)
    detected_kind = "detected fracture"
    if hits.empty:  # no fracture reached the threshold: show the one the model ranked highest, and say so
        hits = table[table["label"] == 1].sort_values("probability", ascending=False, kind="stable")
        detected_kind = f"highest-ranked fracture (below {threshold:.2f})"
    detected = first_drawn(hits, "detected")
    if detected is None:
        return None
    _, clear = example_candidates(table, threshold, str(detected[0]["StudyInstanceUID"]))
    cleared = first_drawn(clear, "cleared")
    panels = []
    for kind, found in ((detected_kind, detected), ("correctly cleared", cleared)):
        if found is None:
            continue
        row, vertebra, picture = found
        truth = "fractured" if int(row["label"]) else "intact"
        panels.append((imread(picture), f"{kind}: {vertebra.vertebra} of study …{str(row['StudyInstanceUID'])[-8:]} "
                                        f"({truth}), p = {vertebra.probability:.2f}"))
    fig = Figure(figsize=(9.0 * len(panels), 6.5))
    for ax, (image, title) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(title, fontsize=14)
    fig.tight_layout()
    path = out_dir / "detection.png"
    fig.savefig(path, dpi=90)
    return path

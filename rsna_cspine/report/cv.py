"""Cross-validation report: score out-of-fold predictions against the labels, with tables and plots."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from rsna_cspine.aggregate import PATIENT_RULES, patient_overall
from rsna_cspine.calibration import cross_fit_patient_overall
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.io.kaggle import check_train_labels, read_train_labels
from rsna_cspine.metric import (
    FORMS,
    column_log_losses,
    competition_weights,
    prior_predictions,
    score_arrays,
    weighted_log_loss,
)

logger = logging.getLogger(__name__)

POOLED = "vertebrae_pooled"
#: The patient_overall rules the report always scores side by side: what ``predict`` does by default
#: (``calibrated``, each study from a fit on the other studies of its fold) and plain noisy-OR.
COMPARED_RULES: tuple[str, ...] = ("calibrated", "noisy_or")
_FOLD_IN_NAME = re.compile(r"fold[_-]?(\d+)", re.IGNORECASE)


def load_oof(path: str | Path) -> pd.DataFrame:
    """Read out-of-fold predictions: one CSV, or every ``oof*.csv`` in a folder.

    A file without a ``fold`` column gets one from its name (``oof_fold3.csv`` → 3) when it has one.

    Args:
        path: a CSV file or a folder of ``oof*.csv`` files (one per fold).

    Returns:
        The concatenated table, ``StudyInstanceUID`` as str.
    """
    path = Path(path)
    files = sorted(path.glob("oof*.csv")) if path.is_dir() else [path]
    if not files:
        raise LayoutError("no oof*.csv file in this folder", path)
    frames = []
    for file in files:
        if not file.is_file():
            raise LayoutError("file not found", file)
        try:
            frame = pd.read_csv(file, dtype={"StudyInstanceUID": str})
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise LayoutError(f"not a readable CSV ({exc})", file) from exc
        if "StudyInstanceUID" not in frame.columns:
            raise LayoutError(f"missing column 'StudyInstanceUID'; found {list(frame.columns)}", file)
        match = _FOLD_IN_NAME.search(file.stem)
        if "fold" not in frame.columns and match:
            frame["fold"] = int(match.group(1))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _check_oof(oof: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Validate OOF rows against the labels (patient_overall may be absent: it is filled later)."""
    missing = [c for c in ("StudyInstanceUID", *VERTEBRAE) if c not in oof.columns]
    if missing:
        raise LayoutError(f"OOF predictions lack columns {missing}; have {list(oof.columns)}")
    oof = oof.copy()
    oof["StudyInstanceUID"] = oof["StudyInstanceUID"].astype(str).str.strip()
    uids = oof["StudyInstanceUID"]
    duplicated = uids[uids.duplicated()].unique()
    if len(duplicated):
        raise LayoutError(f"OOF predictions have duplicated studies ({len(duplicated)}), e.g. {list(duplicated[:5])}")
    unknown = uids[~uids.isin(labels["StudyInstanceUID"])].unique()
    if len(unknown):
        raise LayoutError(
            f"OOF predictions have studies absent from the labels ({len(unknown)}), e.g. {list(unknown[:5])}"
        )
    if "patient_overall" not in oof.columns:
        oof["patient_overall"] = np.nan
    for column in TARGET_COLUMNS:
        oof[column] = pd.to_numeric(oof[column], errors="coerce")
    vertebra = oof[list(VERTEBRAE)].to_numpy(np.float64)
    bad = ~np.isfinite(vertebra) | (vertebra < 0) | (vertebra > 1)
    if bad.any():
        bad_uids = list(uids[bad.any(axis=1)][:5])
        raise LayoutError(f"OOF C1..C7 must be finite probabilities in [0, 1]; bad studies e.g. {bad_uids}")
    given = oof["patient_overall"].dropna().to_numpy(np.float64)
    if ((given < 0) | (given > 1) | ~np.isfinite(given)).any():
        raise LayoutError("OOF patient_overall must be probabilities in [0, 1]")
    return oof


def rule_overall(
    vertebrae: np.ndarray, patient_labels: np.ndarray, studies: list[str], folds: np.ndarray | None, rule: str
) -> np.ndarray:
    """patient_overall of OOF studies by ``rule``; ``calibrated`` is cross-fitted inside each fold.

    Args:
        vertebrae: ``(n, 7)`` out-of-fold vertebra probabilities.
        patient_labels: ``(n,)`` truth (only ``calibrated`` reads it, never for a study's own value).
        studies: the n study UIDs.
        folds: each study's fold, or None (then all studies form one group).
        rule: one of ``aggregate.PATIENT_RULES``.
    """
    if rule != "calibrated":
        return patient_overall(vertebrae, rule=rule)
    groups = np.zeros(len(studies), dtype=np.int64) if folds is None else np.asarray(folds)
    out = np.empty(len(studies))
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        out[rows] = cross_fit_patient_overall(vertebrae[rows], patient_labels[rows], [studies[i] for i in rows])
    return out


def _rules_table(y: np.ndarray, p: np.ndarray, overall: dict[str, np.ndarray]) -> pd.DataFrame:
    """Scores with each patient_overall of ``overall`` (name → ``(n,)``), the vertebra columns unchanged."""
    rows = []
    for name, values in overall.items():
        with_rule = np.column_stack([p[:, : len(VERTEBRAE)], values])
        losses = column_log_losses(y, with_rule)
        stats = _column_stats(y[:, -1], values, float(losses[-1]), 0.5)
        rows.append({"patient_overall": name, **{f"score_{form}": score_arrays(y, with_rule, form) for form in FORMS},
                     "patient_weighted_log_loss": float(losses[-1]), "patient_roc_auc": stats["roc_auc"]})
    return pd.DataFrame(rows)


def _rate(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _column_stats(y: np.ndarray, p: np.ndarray, weighted_log_loss: float, threshold: float) -> dict[str, float]:
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[0, 1]).ravel()
    both_classes = 0 < y.sum() < len(y)
    return {
        "weighted_log_loss": weighted_log_loss,
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "ppv": _rate(tp, tp + fp),
        "prevalence": float(y.mean()),
        "mean_predicted": float(p.mean()),
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def _score_table(y: np.ndarray, p: np.ndarray, prior: np.ndarray) -> pd.DataFrame:
    scores = pd.DataFrame(
        {
            "form": FORMS,
            "model": [score_arrays(y, p, form) for form in FORMS],
            "prior": [score_arrays(y, prior, form) for form in FORMS],
        }
    )
    scores["relative_improvement"] = 1.0 - scores["model"] / scores["prior"]
    return scores


def _per_column_table(y: np.ndarray, p: np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per target column plus the seven vertebra columns pooled."""
    losses = column_log_losses(y, p)
    rows = {c: _column_stats(y[:, j], p[:, j], float(losses[j]), threshold) for j, c in enumerate(TARGET_COLUMNS)}
    vertebra_y, vertebra_p = y[:, :7].ravel(), p[:, :7].ravel()
    pooled_loss = weighted_log_loss(vertebra_y, vertebra_p, competition_weights(y)[:, :7].ravel())
    rows[POOLED] = _column_stats(vertebra_y, vertebra_p, pooled_loss, threshold)
    table = pd.DataFrame.from_dict(rows, orient="index")
    counts = ["n", "n_positive", "tn", "fp", "fn", "tp"]
    table[counts] = table[counts].astype(np.int64)
    table.index.name = "column"
    return table


def _fold_table(oof: pd.DataFrame, y: np.ndarray, p: np.ndarray, prior: np.ndarray) -> pd.DataFrame:
    """Study-form score of the model and of the prior within each fold."""
    rows = []
    for fold in sorted(oof["fold"].unique()):
        mask = (oof["fold"] == fold).to_numpy()
        rows.append(
            {"fold": fold, "n": int(mask.sum()), "model": score_arrays(y[mask], p[mask]),
             "prior": score_arrays(y[mask], prior[mask])}
        )
    return pd.DataFrame(rows)


def _reliability(name: str, y: np.ndarray, p: np.ndarray, n_bins: int) -> pd.DataFrame:
    # By hand because sklearn's calibration_curve drops empty bins and returns no counts;
    # the binning (uniform edges, searchsorted on inner edges) is the same as sklearn's.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(bins, p, minlength=n_bins) / count
        observed = np.bincount(bins, y, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "column": name,
            "bin": np.arange(n_bins),
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "mean_predicted": mean_predicted,
            "observed_rate": observed,
            "count": count,
        }
    )


def _plot_roc(y: np.ndarray, p: np.ndarray, per_column: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for j, column in enumerate(TARGET_COLUMNS):
        if not 0 < y[:, j].sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
        overall = column == "patient_overall"
        ax.plot(
            fpr,
            tpr,
            linewidth=2.5 if overall else 1.2,
            color="black" if overall else None,
            label=f"{column} (AUC {per_column.loc[column, 'roc_auc']:.3f})",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, out-of-fold", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)


def _plot_reliability(calibration: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(7, 8))
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect")
    for k, (name, style) in enumerate(((POOLED, "o-"), ("patient_overall", "s-"))):
        table = calibration[(calibration["column"] == name) & (calibration["count"] > 0)]
        top.plot(table["mean_predicted"], table["observed_rate"], style, label=name)
        width = table["bin_upper"] - table["bin_lower"]
        # Two bars side by side in each bin: pooled vertebrae on the left, patient_overall on the right.
        bottom.bar(table["bin_lower"] + width * (0.05 + 0.45 * k), table["count"], width=width * 0.45,
                   align="edge", color=f"C{k}", alpha=0.8, label=name)
    top.set(ylabel="observed fracture rate", title="Reliability, out-of-fold", xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted probability", ylabel="count")
    bottom.set_yscale("log")
    fig.savefig(path, dpi=100)


def _plot_confusion(per_column: pd.DataFrame, threshold: float, path: Path) -> None:
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 4)
    for ax, column in zip(axes.ravel(), TARGET_COLUMNS):
        row = per_column.loc[column]
        matrix = np.array([[row["tn"], row["fp"]], [row["fn"], row["tp"]]], dtype=np.int64)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set(title=column, xticks=[0, 1], yticks=[0, 1], xticklabels=["pred 0", "pred 1"],
               yticklabels=["true 0", "true 1"])
    fig.suptitle(f"Confusion matrices at threshold {threshold:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _markdown(frame: pd.DataFrame, index: bool = False) -> str:
    # object dtype keeps integer counts as integers: tabulate would print a mixed frame's ints as floats.
    return frame.astype(object).to_markdown(index=index, floatfmt=".4f")


def cv_report(
    oof: pd.DataFrame,
    labels: pd.DataFrame,
    out_dir: Path,
    threshold: float = 0.5,
    rule: str = "calibrated",
    n_bins: int = 10,
) -> dict:
    """Score out-of-fold predictions and write the CV report folder.

    Writes ``scores.csv`` (all metric forms, model vs prior, relative improvement), ``rules.csv`` (the
    scores with the ``calibrated`` and ``noisy_or`` patient_overall side by side, and with the files' own
    column when they have one), ``folds.csv`` (per fold, when folds are known), ``per_column.csv``, ``confusion_matrices.csv``,
    ``calibration.csv``, ``roc.png``, ``reliability.png``, ``confusion.png`` and ``report.md``.
    The prior is each column's prevalence among the scored studies. Studies of ``labels`` without a
    prediction are left out of every number.

    Args:
        oof: ``StudyInstanceUID``, C1..C7 probabilities, optional ``patient_overall`` (filled with
            ``rule`` where absent) and optional ``fold``.
        labels: train.csv-like labels.
        out_dir: folder to write into (created).
        threshold: probability at which a prediction counts as positive.
        rule: patient_overall rule for studies without one (``aggregate.PATIENT_RULES``; ``calibrated``, the
            default and what ``predict`` does, is cross-fitted inside each fold: :func:`rule_overall`).
        n_bins: number of equal-width bins of the reliability table.

    Returns:
        ``{"n_studies", "n_labelled", "scores": {form: {"model", "prior", "relative_improvement"}},
        "per_column": {column: {...}}, "files": {name: Path}}``.

    Raises:
        LayoutError: unknown or duplicated study ids, missing columns, bad probabilities.
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
    if rule not in PATIENT_RULES:
        raise ConfigError(f"unknown patient_overall rule {rule!r}; expected one of {PATIENT_RULES}")
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    labels = check_train_labels(labels, source="labels")
    oof = _check_oof(oof, labels)
    if oof.empty:
        raise LayoutError("OOF predictions have no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    truth = labels.set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"]]
    y = truth[list(TARGET_COLUMNS)].to_numpy(np.int64)
    has_folds = "fold" in oof.columns and oof["fold"].notna().all()
    vertebrae = oof[list(VERTEBRAE)].to_numpy(np.float64)
    studies = oof["StudyInstanceUID"].tolist()
    folds = oof["fold"].to_numpy() if has_folds else None
    overall = {r: rule_overall(vertebrae, y[:, -1], studies, folds, r) for r in dict.fromkeys((rule, *COMPARED_RULES))}
    absent = oof["patient_overall"].isna().to_numpy()
    compared = {"as in the OOF files": oof["patient_overall"].to_numpy(np.float64)} if not absent.any() else {}
    compared.update({r: overall[r] for r in COMPARED_RULES})
    if absent.any():
        logger.info("patient_overall from the %r rule for %d studies", rule, absent.sum())
        oof.loc[absent, "patient_overall"] = overall[rule][absent]
    p = oof[list(TARGET_COLUMNS)].to_numpy(np.float64)
    prior = np.tile(prior_predictions(truth), (len(y), 1))

    scores = _score_table(y, p, prior)
    rules = _rules_table(y, p, compared)
    per_column = _per_column_table(y, p, threshold)
    confusion = per_column[["tn", "fp", "fn", "tp"]].assign(threshold=threshold)
    calibration = pd.concat(
        [_reliability(c, y[:, j], p[:, j], n_bins) for j, c in enumerate(TARGET_COLUMNS)]
        + [_reliability(POOLED, y[:, :7].ravel(), p[:, :7].ravel(), n_bins)],
        ignore_index=True,
    )
    folds = _fold_table(oof, y, p, prior) if has_folds else None

    files = {
        "scores": out_dir / "scores.csv",
        "rules": out_dir / "rules.csv",
        "per_column": out_dir / "per_column.csv",
        "confusion_matrices": out_dir / "confusion_matrices.csv",
        "calibration": out_dir / "calibration.csv",
        "roc_png": out_dir / "roc.png",
        "reliability_png": out_dir / "reliability.png",
        "confusion_png": out_dir / "confusion.png",
        "report": out_dir / "report.md",
    }
    scores.to_csv(files["scores"], index=False)
    rules.to_csv(files["rules"], index=False)
    per_column.drop(columns=["tn", "fp", "fn", "tp"]).to_csv(files["per_column"])
    confusion.to_csv(files["confusion_matrices"])
    calibration.to_csv(files["calibration"], index=False)
    if folds is not None:
        files["folds"] = out_dir / "folds.csv"
        folds.to_csv(files["folds"], index=False)
    _plot_roc(y, p, per_column, files["roc_png"])
    _plot_reliability(calibration, files["reliability_png"])
    _plot_confusion(per_column, threshold, files["confusion_png"])

    sections = [
        "# Cross-validation report",
        f"{len(y)} studies with out-of-fold predictions (of {len(labels)} labelled); "
        f"patient_overall rule where absent: `{rule}`; threshold {threshold:g}. "
        "Prior = each column's prevalence among these studies. Lower scores are better.",
        "## Competition score\n\n" + _markdown(scores),
        "## patient_overall rules side by side\n\n`calibrated` is what `predict` does by default: noisy-OR "
        "through a Platt scaling; here each study's value comes from a fit on the other studies of its fold "
        "(cross-fit), so no study is scored by a fit that saw its label.\n\n" + _markdown(rules),
    ]
    if folds is not None:
        sections.append("## Per fold (study form)\n\n" + _markdown(folds))
    sections += [
        "## Per column\n\n" + _markdown(per_column.drop(columns=["tn", "fp", "fn", "tp"]), index=True),
        f"## Confusion matrices (threshold {threshold:g})\n\n" + _markdown(confusion, index=True),
        "![confusion matrices](confusion.png)",
        "## ROC\n\n![ROC curves](roc.png)",
        "## Calibration\n\n![reliability diagram](reliability.png)\n\n" + _markdown(calibration),
    ]
    files["report"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    logger.info("CV report for %d studies written to %s", len(y), out_dir)

    return {
        "n_studies": int(len(y)),
        "n_labelled": int(len(labels)),
        "scores": scores.set_index("form").astype(float).to_dict(orient="index"),
        "rules": rules.set_index("patient_overall").astype(float).to_dict(orient="index"),
        "per_column": per_column.to_dict(orient="index"),
        "files": files,
    }


def run_cv(
    oof_path: str | Path,
    labels_path: str | Path,
    out_dir: str | Path,
    threshold: float = 0.5,
    rule: str = "calibrated",
    n_bins: int = 10,
) -> dict:
    """Read OOF files and train.csv, then write the CV report (the ``rsna-cspine cv`` command).

    Args:
        oof_path: folder of ``oof*.csv`` files, or one CSV.
        labels_path: train.csv.
        out_dir: report folder.
        threshold: probability at which a prediction counts as positive.
        rule: patient_overall rule for OOF rows without one.
        n_bins: reliability bins.

    Returns:
        The summary returned by ``cv_report``.
    """
    return cv_report(load_oof(oof_path), read_train_labels(labels_path), Path(out_dir), threshold, rule, n_bins)

"""Metrics and reports of a 2D classifier on one split: tables (CSV + Markdown), confusion matrix and ROC plots.

Binary problems report precision, recall (= sensitivity), specificity, F1 and ROC AUC of the positive
class; multi-class problems report their macro averages over one-vs-rest (ROC AUC: sklearn's
one-vs-rest macro). The sklearn classification report and the per-class table are written for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from rsna_cspine.errors import ConfigError

log = logging.getLogger(__name__)

#: Class names that mean "nothing found"; the other class of a binary problem is the positive one.
NEGATIVE_NAMES: frozenset[str] = frozenset(
    {"normal", "negative", "neg", "healthy", "no_fracture", "nofracture", "no-fracture", "non_fracture", "none", "0", "no",
     "absent"}
)
METRIC_COLUMNS: tuple[str, ...] = (
    "loss", "accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "roc_auc", "n",
)


def positive_index(classes: list[str], positive_class: str | None = None) -> int:
    """The class binary metrics are about.

    Args:
        classes: sorted class names.
        positive_class: explicit choice; None → the one class not named like a negative (see
            :data:`NEGATIVE_NAMES`), else the last class.

    Raises:
        ConfigError: ``positive_class`` is not one of ``classes``.
    """
    if positive_class is not None:
        if positive_class not in classes:
            raise ConfigError(f"positive_class {positive_class!r} is not one of the classes {classes}")
        return classes.index(positive_class)
    not_negative = [i for i, c in enumerate(classes) if c.lower() not in NEGATIVE_NAMES]
    return not_negative[0] if len(classes) == 2 and len(not_negative) == 1 else len(classes) - 1


def negative_index(classes: list[str], negative_class: str | None = None) -> int | None:
    """In a problem of more than two classes, the class meaning "no finding" (for the present/absent view).

    Args:
        classes: class names in output order.
        negative_class: explicit choice; None → the one class named like a negative (see
            :data:`NEGATIVE_NAMES`), if exactly one is.

    Returns:
        Its index, or None (two classes, or no negative class).

    Raises:
        ConfigError: ``negative_class`` is not one of ``classes``.
    """
    if negative_class is not None:
        if negative_class not in classes:
            raise ConfigError(f"negative_class {negative_class!r} is not one of the classes {classes}")
        return classes.index(negative_class) if len(classes) > 2 else None
    named = [i for i, c in enumerate(classes) if c.lower() in NEGATIVE_NAMES]
    return named[0] if len(classes) > 2 and len(named) == 1 else None


def _rate(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def per_class_table(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One-vs-rest precision, recall (sensitivity), specificity, F1, ROC AUC and support of every class.

    Args:
        y_true: ``(n,)`` class numbers.
        probs: ``(n, K)`` class probabilities.
        classes: the K class names.
    """
    k = len(classes)
    y_pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(k)), zero_division=np.nan
    )
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    rows = []
    for i, name in enumerate(classes):
        tp = matrix[i, i]
        fp = matrix[:, i].sum() - tp
        fn = matrix[i, :].sum() - tp
        tn = matrix.sum() - tp - fp - fn
        is_class = (y_true == i).astype(int)
        auc = float(roc_auc_score(is_class, probs[:, i])) if 0 < is_class.sum() < len(is_class) else float("nan")
        rows.append({
            "class": name, "precision": float(precision[i]), "recall": float(recall[i]),
            "specificity": _rate(tn, tn + fp), "f1": float(f1[i]), "roc_auc": auc, "support": int(support[i]),
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
        })
    return pd.DataFrame(rows)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], positive_class: str | None = None
) -> dict[str, float]:
    """Headline metrics of one split (keys :data:`METRIC_COLUMNS`).

    Args:
        y_true: ``(n,)`` class numbers.
        probs: ``(n, K)`` class probabilities (rows sum to 1).
        classes: the K class names.
        positive_class: see :func:`positive_index` (binary problems only).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(classes)
    if len(y_true) == 0:
        return {name: float("nan") for name in METRIC_COLUMNS} | {"n": 0}
    table = per_class_table(y_true, probs, classes)
    clipped = np.clip(probs, 1e-7, 1.0)
    metrics: dict[str, float] = {
        "loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=list(range(k)))),
        "accuracy": float(accuracy_score(y_true, probs.argmax(1))),
    }
    if k == 2:
        row = table.iloc[positive_index(classes, positive_class)]
        summary = {c: float(row[c]) for c in ("precision", "recall", "specificity", "f1", "roc_auc")}
    else:
        summary = {c: float(np.nanmean(table[c])) if table[c].notna().any() else float("nan")
                   for c in ("precision", "recall", "specificity", "f1")}
        present = np.unique(y_true)
        summary["roc_auc"] = (
            float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))
            if len(present) == k else float("nan")
        )
    metrics.update(summary)
    metrics["sensitivity"] = metrics["recall"]
    metrics["n"] = int(len(y_true))
    return {name: metrics[name] for name in METRIC_COLUMNS}


def _plot_confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    fig = Figure(figsize=(1.6 * len(classes) + 3, 1.4 * len(classes) + 2.5))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str], positive: int, title: str, path: Path) -> None:
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    # A binary problem needs one curve (the positive class's); the other is its mirror image.
    shown = [positive] if len(classes) == 2 else range(len(classes))
    for i in shown:
        is_class = (y_true == i).astype(int)
        if 0 < is_class.sum() < len(is_class):
            RocCurveDisplay.from_predictions(is_class, probs[:, i], ax=ax, name=classes[i], plot_chance_level=False)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    fig.savefig(path, dpi=100)


def _markdown(frame: pd.DataFrame) -> str:
    # object dtype keeps integer counts as integers in tabulate's output.
    return frame.astype(object).to_markdown(index=False, floatfmt=".4f")


def write_split_report(
    out_dir: str | Path,
    split: str,
    frame: pd.DataFrame,
    probs: np.ndarray,
    classes: list[str],
    positive_class: str | None = None,
    id_column: str = "path",
    title: str | None = None,
) -> dict[str, object]:
    """Write one split's report files into ``out_dir`` (names start with the split).

    Files: ``{split}_predictions.csv`` (id, label, predicted, prob_<class>...), ``{split}_metrics.csv``,
    ``{split}_per_class.csv``, ``{split}_confusion_matrix.csv``, ``{split}_classification_report.txt``,
    ``{split}_confusion.png``, ``{split}_roc.png`` and ``{split}_report.md``.

    Args:
        out_dir: report folder (created).
        split: ``val``, ``test``, ... (file name prefix; ``val_study`` for a split's studies).
        frame: the split's rows (``id_column``, ``label``, ``target``), in ``probs`` order.
        probs: ``(n, K)`` probabilities.
        classes: class names.
        positive_class: see :func:`positive_index`.
        id_column: the column naming each row (``path`` for images, ``study`` for studies).
        title: the report's heading (default: ``{split} split (n images)``).

    Returns:
        ``{"metrics": {...}, "files": {name: Path}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = frame["target"].to_numpy(np.int64)
    k = len(classes)
    metrics = classification_metrics(y_true, probs, classes, positive_class)
    per_class = per_class_table(y_true, probs, classes)
    matrix = confusion_matrix(y_true, probs.argmax(1), labels=list(range(k)))
    matrix_frame = pd.DataFrame(matrix, index=[f"true_{c}" for c in classes], columns=[f"pred_{c}" for c in classes])
    text_report = classification_report(
        y_true, probs.argmax(1), labels=list(range(k)), target_names=classes, digits=4, zero_division=0
    )
    predictions = frame[[id_column, "label"]].reset_index(drop=True).copy()
    predictions["predicted"] = [classes[i] for i in probs.argmax(1)]
    for i, name in enumerate(classes):
        predictions[f"prob_{name}"] = probs[:, i]

    files = {name: out_dir / f"{split}_{name}" for name in (
        "predictions.csv", "metrics.csv", "per_class.csv", "confusion_matrix.csv", "classification_report.txt",
        "confusion.png", "roc.png", "report.md",
    )}
    predictions.to_csv(files["predictions.csv"], index=False)
    pd.DataFrame([metrics]).to_csv(files["metrics.csv"], index=False)
    per_class.to_csv(files["per_class.csv"], index=False)
    matrix_frame.to_csv(files["confusion_matrix.csv"])
    files["classification_report.txt"].write_text(text_report, encoding="utf-8")
    _plot_confusion(matrix, classes, f"{split}: confusion matrix (n={len(y_true)})", files["confusion.png"])
    positive_at = positive_index(classes, positive_class)
    _plot_roc(y_true, probs, classes, positive_at, f"{split}: ROC", files["roc.png"])
    positive = classes[positive_at] if k == 2 else None
    summary = (f"binary metrics about the positive class `{positive}`" if positive
               else "precision / recall / specificity / F1: macro means over the classes; ROC AUC: one-vs-rest macro")
    sections = [
        f"## {title or f'{split} split ({len(y_true)} images)'}",
        f"Classes: {', '.join(f'`{c}`' for c in classes)}; {summary}.",
        _markdown(pd.DataFrame([metrics])),
        "### Per class\n\n" + _markdown(per_class),
        "### Confusion matrix (rows: truth, columns: prediction)\n\n" + matrix_frame.to_markdown(),
        f"![confusion matrix]({files['confusion.png'].name}) ![ROC]({files['roc.png'].name})",
        "### sklearn classification report\n\n```\n" + text_report.rstrip() + "\n```",
    ]
    files["report.md"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return {"metrics": metrics, "files": files}

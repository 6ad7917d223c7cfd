"""Views of a split's predictions: per image, per study (several images of one patient), and each of them
judged as fracture present vs absent when the classes are grades.

A study's probabilities come from its images (``data.study_agg``): the ``mean`` of their class
probabilities, or ``max``: the probabilities of its most suspicious image. Only its middle ``k`` images
take part when ``data.middle_k`` is set (the sagittal planes through the column's centre show it best).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rsna_cspine.twod.config import TwoDDataConfig
from rsna_cspine.twod.report import negative_index, positive_index

#: The name of the "any other class" side of a present/absent view.
PRESENT = "present"


@dataclass
class View:
    """One way of judging a split's predictions.

    Attributes:
        frame: rows (``id_column``, ``label``, ``target``) in ``probs`` order.
        probs: ``(n, K)`` class probabilities.
        classes: the K class names.
        id_column: ``path`` (images) or ``study``.
        positive_class: the positive class of a binary view (None: the rule of :func:`positive_index`).
    """

    frame: pd.DataFrame
    probs: np.ndarray
    classes: list[str]
    id_column: str = "path"
    positive_class: str | None = None


def middle_rows(frame: pd.DataFrame, k: int) -> np.ndarray:
    """Positions (0-based, in ``frame`` order) of the middle ``k`` images of every study.

    A study's images are ordered by ``slice`` then ``path``; of ``n > k`` images the ``k`` from position
    ``(n - k) // 2`` are kept (the lower middle when ``n - k`` is odd); ``k = 0`` or ``k ≥ n`` keeps all.

    Args:
        frame: rows with ``study``, ``slice`` and ``path``.
        k: images kept per study (0 = all).
    """
    order = frame.reset_index(drop=True).reset_index(names="position")
    order = order.sort_values(["study", "slice", "path"], kind="stable")
    rank = order.groupby("study").cumcount()
    count = order.groupby("study")["position"].transform("size")
    start = (count - k) // 2
    keep = (k == 0) | (count <= k) | ((rank >= start) & (rank < start + k))
    return np.sort(order.loc[keep, "position"].to_numpy())


def suspicion(probs: np.ndarray, classes: list[str], positive_class: str | None, negative: int | None) -> np.ndarray:
    """How strongly each image points at a finding (what ``max`` picks a study's image by).

    Two classes: the positive class's probability; with a negative class: one minus its probability;
    otherwise the largest class probability (the most confident image).
    """
    if len(classes) == 2:
        return probs[:, positive_index(classes, positive_class)]
    if negative is not None:
        return 1.0 - probs[:, negative]
    return probs.max(1)


def aggregate_studies(
    frame: pd.DataFrame,
    probs: np.ndarray,
    classes: list[str],
    rule: str = "mean",
    middle_k: int = 0,
    positive_class: str | None = None,
    negative: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """One row of probabilities per study from its images'.

    Args:
        frame: image rows (``study``, ``slice``, ``path``, ``label``, ``target``) in ``probs`` order.
        probs: ``(n, K)`` image class probabilities.
        classes: class names.
        rule: ``mean`` or ``max`` (see :func:`suspicion`).
        middle_k: use each study's middle ``k`` images (0 = all).
        positive_class: a binary problem's positive class (for ``max``).
        negative: index of the negative class of a graded problem (for ``max``), or None.

    Returns:
        ``(studies, study_probs)``: ``study``, ``label``, ``target``, ``images`` (how many took part), sorted
        by study; and their ``(n_studies, K)`` probabilities.
    """
    frame = frame.reset_index(drop=True)
    kept = middle_rows(frame, middle_k)
    used = frame.iloc[kept].reset_index(drop=True)
    used_probs = np.asarray(probs, dtype=np.float64)[kept]
    score = suspicion(used_probs, classes, positive_class, negative)
    rows, out = [], []
    for study, rows_of_study in used.groupby("study", sort=True).indices.items():
        if rule == "mean":
            out.append(used_probs[rows_of_study].mean(0))
        else:
            out.append(used_probs[rows_of_study[int(np.argmax(score[rows_of_study]))]])
        first = used.iloc[rows_of_study[0]]
        rows.append({"study": study, "label": first["label"], "target": int(first["target"]),
                     "images": len(rows_of_study)})
    columns = ["study", "label", "target", "images"]
    return pd.DataFrame(rows, columns=columns), np.asarray(out, dtype=np.float64).reshape(len(rows), len(classes))


def binary_view(view: View, negative: int) -> View:
    """A graded view judged as fracture present (any class but ``negative``) vs absent."""
    classes = [view.classes[negative], PRESENT]
    absent = view.probs[:, negative]
    frame = view.frame.copy()
    frame["target"] = (frame["target"].to_numpy() != negative).astype(np.int64)
    frame["label"] = [classes[t] for t in frame["target"]]
    return View(frame=frame, probs=np.stack([absent, 1.0 - absent], axis=1), classes=classes,
                id_column=view.id_column, positive_class=PRESENT)


def prediction_views(
    frame: pd.DataFrame, probs: np.ndarray, classes: list[str], data: TwoDDataConfig, has_studies: bool
) -> dict[str, View]:
    """Every view a split is judged by, keyed by its metric prefix (``""``, ``binary_``, ``study_``, ``study_binary_``).

    Args:
        frame: the split's image rows, in ``probs`` order.
        probs: ``(n, K)`` image class probabilities.
        classes: class names.
        data: the data config (``negative_class``, ``positive_class``, ``study_agg``, ``middle_k``).
        has_studies: whether studies hold several images (the dataset's, not only this split's).
    """
    negative = negative_index(classes, data.negative_class)
    views = {"": View(frame=frame, probs=np.asarray(probs, dtype=np.float64), classes=classes,
                      positive_class=data.positive_class)}
    if has_studies:
        studies, study_probs = aggregate_studies(frame, probs, classes, data.study_agg, data.middle_k,
                                                 data.positive_class, negative)
        views["study_"] = View(frame=studies, probs=study_probs, classes=classes, id_column="study",
                               positive_class=data.positive_class)
    if negative is not None:
        for prefix in list(views):
            views[f"{prefix}binary_"] = binary_view(views[prefix], negative)
    return views

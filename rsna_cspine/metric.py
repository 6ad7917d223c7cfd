"""The competition metric: weighted multi-label log loss over C1..C7 and patient_overall.

Every row is weighted by its column and its truth: vertebra rows 1 (negative) / 2 (positive),
patient_overall rows 7 / 14 (``constants.VERTEBRA_WEIGHTS``, ``constants.PATIENT_WEIGHTS``).
Probabilities are clipped to ``[PROB_EPS, 1 - PROB_EPS]`` before the log. Three reductions are in use
(DESIGN.md, "The metric"), each one weighted mean of the rows' log losses, computed by
``sklearn.metrics.log_loss`` with the form's row weights:

- ``"study"`` (default, the one graders reproduce): each study's weighted mean loss over its rows,
  then the plain mean over studies.
- ``"global"``: one weighted mean over all rows of all studies.
- ``"column"``: each column's weighted mean loss over studies (``L_c = Σ w·bce / Σ w`` within the
  column), then ``(L_C1 + … + L_C7 + 7·L_patient_overall) / 14``. Our reading of DESIGN.md's
  "(sum C1..C7 + 7*overall)/14": the 1 and 7 are the columns' negative weights, so the overall column
  counts as much as the seven vertebrae together; when a column has no rows at all, the divisor is the
  sum of the present columns' factors.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from rsna_cspine.constants import (
    PATIENT_WEIGHTS,
    PROB_EPS,
    REAL_PREVALENCE,
    TARGET_COLUMNS,
    VERTEBRA_WEIGHTS,
)
from rsna_cspine.errors import LayoutError, SubmissionError

FORMS: tuple[str, ...] = ("study", "global", "column")

_N_TARGETS = len(TARGET_COLUMNS)
_NEG_WEIGHTS = np.array([VERTEBRA_WEIGHTS[0]] * (_N_TARGETS - 1) + [PATIENT_WEIGHTS[0]])
_POS_WEIGHTS = np.array([VERTEBRA_WEIGHTS[1]] * (_N_TARGETS - 1) + [PATIENT_WEIGHTS[1]])
#: Factor of each column's mean loss in the "column" form: 1 per vertebra, 7 for patient_overall.
_COLUMN_FACTORS = _NEG_WEIGHTS / VERTEBRA_WEIGHTS[0]
_COLUMN_INDEX = {name: i for i, name in enumerate(TARGET_COLUMNS)}
_ROW_ID = re.compile(r"^(?P<uid>.+)_(?P<target>C[1-7]|patient_overall)$")
_MAX_EXAMPLES = 5


def _examples(values: list | pd.Index | np.ndarray) -> str:
    """Up to five items of ``values`` and how many there are, for error messages."""
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_MAX_EXAMPLES])
    more = f" (+{len(values) - _MAX_EXAMPLES} more)" if len(values) > _MAX_EXAMPLES else ""
    return f"{len(values)}: {shown}{more}"


def competition_weights(y_true: np.ndarray) -> np.ndarray:
    """Per-entry competition weights for targets laid out in ``TARGET_COLUMNS`` order.

    Used both by the metric and as sample weights of the stage-2 trainer's weighted BCE.

    Args:
        y_true: 0/1 (or soft) targets, shape ``(..., 8)`` in ``TARGET_COLUMNS`` order.

    Returns:
        Float array of the same shape: 1/2 on vertebra columns, 7/14 on patient_overall
        (linear in between for soft targets).
    """
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim == 0 or y.shape[-1] != _N_TARGETS:
        raise ValueError(f"targets must have last axis {_N_TARGETS} ({TARGET_COLUMNS}), got shape {y.shape}")
    return _NEG_WEIGHTS + y * (_POS_WEIGHTS - _NEG_WEIGHTS)


def _log_loss(y: np.ndarray, p: np.ndarray, weight: np.ndarray) -> float:
    """``Σ w·bce / Σ w`` of flat 0/1 truths and probabilities, with the competition's clip.

    scikit-learn's own clip (the float64 machine epsilon; its ``eps`` argument is gone since 1.5) never
    acts after this one.
    """
    return float(log_loss(y, np.clip(p, PROB_EPS, 1.0 - PROB_EPS), sample_weight=weight, labels=[0, 1]))


def _reduce(
    y: np.ndarray, p: np.ndarray, weight: np.ndarray, study_codes: np.ndarray, column_codes: np.ndarray, form: str
) -> float:
    """The score of ``form`` for flat rows (in any order, any subset).

    Every form is one weighted mean of the rows' losses: ``study`` divides each row's weight by its
    study's total (each study then counts once), ``column`` by its column's total times the column's
    factor (each column's mean counts with its factor); ``global`` keeps the weights.
    """
    if form == "global":
        return _log_loss(y, p, weight)
    if form == "study":
        return _log_loss(y, p, weight / np.bincount(study_codes, weight)[study_codes])
    if form == "column":
        column_weight = np.bincount(column_codes, weight, minlength=_N_TARGETS)
        per_column = _COLUMN_FACTORS / np.where(column_weight > 0, column_weight, 1.0)  # absent columns: unused
        return _log_loss(y, p, weight * per_column[column_codes])
    raise ValueError(f"unknown metric form {form!r}; expected one of {FORMS}")


def _check_arrays(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != _N_TARGETS or y.shape[0] == 0:
        raise SubmissionError(f"y_true must have shape (n_studies>0, {_N_TARGETS}), got {y.shape}")
    if p.shape != y.shape:
        raise SubmissionError(f"y_pred shape {p.shape} differs from y_true shape {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise SubmissionError(f"y_true must be 0/1; found values {_examples(np.unique(y[~np.isin(y, (0.0, 1.0))]))}")
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        raise SubmissionError(f"y_pred must be finite probabilities in [0, 1]; found {_examples(p[bad])}")
    return y, p


def score_arrays(y_true: np.ndarray, y_pred: np.ndarray, form: str = "study") -> float:
    """Competition score of ``(n_studies, 8)`` arrays in ``TARGET_COLUMNS`` order (the trainers' fast path).

    Args:
        y_true: 0/1 truth, shape ``(n_studies, 8)``.
        y_pred: probabilities in [0, 1], same shape; clipped to ``[PROB_EPS, 1 - PROB_EPS]``.
        form: ``"study"``, ``"global"`` or ``"column"`` (see the module docstring).

    Returns:
        The weighted log loss (lower is better; constant 0.5 gives ln 2).
    """
    if form not in FORMS:
        raise ValueError(f"unknown metric form {form!r}; expected one of {FORMS}")
    y, p = _check_arrays(y_true, y_pred)
    n_studies = y.shape[0]
    return _reduce(
        y.ravel(),
        p.ravel(),
        competition_weights(y).ravel(),
        np.repeat(np.arange(n_studies), _N_TARGETS),
        np.tile(np.arange(_N_TARGETS), n_studies),
        form,
    )


def column_log_losses(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Each column's competition-weighted mean log loss (the terms of the "column" form).

    Args:
        y_true: 0/1 truth, shape ``(n_studies, 8)`` in ``TARGET_COLUMNS`` order.
        y_pred: probabilities in [0, 1], same shape.

    Returns:
        Array ``(8,)``: ``Σ w·bce / Σ w`` per column.
    """
    y, p = _check_arrays(y_true, y_pred)
    weight = competition_weights(y)
    return np.array([_log_loss(y[:, j], p[:, j], weight[:, j]) for j in range(_N_TARGETS)])


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray) -> float:
    """Weighted mean binary log loss ``Σ w·bce / Σ w`` of flat arrays, with the competition's clip.

    Args:
        y_true: 0/1 truth, shape ``(n,)``.
        y_pred: probabilities in [0, 1], shape ``(n,)``.
        sample_weight: non-negative weights, shape ``(n,)``, not all zero.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64)
    if not (y.shape == p.shape == w.shape) or y.ndim != 1:
        raise ValueError(f"need three equal 1-D shapes, got {y.shape}, {p.shape}, {w.shape}")
    return _log_loss(y, p, w)


def _check_table(frame: pd.DataFrame, name: str) -> pd.Series:
    """Check a row_id/fractured table and return ``fractured`` indexed by row_id (as str)."""
    missing = [c for c in ("row_id", "fractured") if c not in frame.columns]
    if missing:
        raise SubmissionError(f"{name} lacks columns {missing}; has {list(frame.columns)}")
    row_ids = frame["row_id"].astype(str)
    duplicated = row_ids[row_ids.duplicated()].unique()
    if len(duplicated):
        raise SubmissionError(f"{name} has duplicated row_ids, {_examples(duplicated)}")
    return pd.Series(pd.to_numeric(frame["fractured"], errors="coerce").to_numpy(np.float64), index=row_ids)


def _parse_row_ids(row_ids: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Split ``{uid}_{target}`` row ids into study codes and column codes."""
    parts = row_ids.to_series().str.extract(_ROW_ID)
    unparsed = row_ids[parts["uid"].isna().to_numpy()]
    if len(unparsed):
        raise SubmissionError(
            f"row_ids must look like '{{StudyInstanceUID}}_{{C1..C7|patient_overall}}'; bad ones {_examples(unparsed)}"
        )
    study_codes, _ = pd.factorize(parts["uid"])
    return study_codes, parts["target"].map(_COLUMN_INDEX).to_numpy(np.int64)


def competition_score(solution: pd.DataFrame, submission: pd.DataFrame, form: str = "study") -> float:
    """Score a Kaggle-style submission against its solution, both keyed by ``row_id``.

    Args:
        solution: ``row_id`` (``{uid}_{C1..C7|patient_overall}``) and ``fractured`` as 0/1 truth;
            other columns (e.g. Kaggle's ``Usage``) are ignored.
        submission: ``row_id`` and ``fractured`` as a probability, rows in any order.
        form: ``"study"``, ``"global"`` or ``"column"`` (see the module docstring).

    Returns:
        The weighted log loss (lower is better).

    Raises:
        SubmissionError: missing, extra or duplicated row_ids, malformed row_ids, non-finite or
            out-of-[0, 1] probabilities, or non-binary truth; the message lists examples.
    """
    if form not in FORMS:
        raise ValueError(f"unknown metric form {form!r}; expected one of {FORMS}")
    truth = _check_table(solution, "solution")
    predicted = _check_table(submission, "submission")
    if truth.empty:
        raise SubmissionError("solution has no rows")
    missing = truth.index.difference(predicted.index, sort=False)
    if len(missing):
        raise SubmissionError(f"submission lacks row_ids of the solution, {_examples(missing)}")
    extra = predicted.index.difference(truth.index, sort=False)
    if len(extra):
        raise SubmissionError(f"submission has row_ids absent from the solution, {_examples(extra)}")
    y = truth.to_numpy()
    not_binary = ~np.isin(y, (0.0, 1.0))
    if not_binary.any():
        raise SubmissionError(f"solution 'fractured' must be 0/1; bad rows {_examples(truth.index[not_binary])}")
    p = predicted.reindex(truth.index).to_numpy()
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        examples = [f"{rid}={value}" for rid, value in zip(truth.index[bad], p[bad])]
        raise SubmissionError(
            f"submission 'fractured' must be finite probabilities in [0, 1]; bad rows {_examples(examples)}"
        )
    study_codes, column_codes = _parse_row_ids(truth.index)
    weight = np.where(y == 1.0, _POS_WEIGHTS[column_codes], _NEG_WEIGHTS[column_codes])
    return _reduce(y, p, weight, study_codes, column_codes, form)


def _wide_to_long(frame: pd.DataFrame, dtype: type) -> pd.DataFrame:
    uids = frame["StudyInstanceUID"].astype(str).to_numpy()
    targets = np.array(TARGET_COLUMNS, dtype=object)
    row_ids = (np.repeat(uids, _N_TARGETS).astype(object) + "_" + np.tile(targets, len(uids))).astype(str)
    values = frame[list(TARGET_COLUMNS)].to_numpy(dtype).ravel()
    return pd.DataFrame({"row_id": row_ids, "fractured": values})


def labels_to_solution(labels: pd.DataFrame) -> pd.DataFrame:
    """Turn train.csv-like labels into a Kaggle solution table.

    Args:
        labels: ``StudyInstanceUID`` and the 0/1 columns ``C1..C7, patient_overall``.

    Returns:
        ``row_id, fractured`` with 8 rows per study, studies in input order, columns in
        ``TARGET_COLUMNS`` order.
    """
    missing = [c for c in ("StudyInstanceUID", *TARGET_COLUMNS) if c not in labels.columns]
    if missing:
        raise LayoutError(f"labels lack columns {missing}; have {list(labels.columns)}")
    return _wide_to_long(labels, np.int64)


def predictions_to_submission(preds: pd.DataFrame) -> pd.DataFrame:
    """Turn a wide prediction table into Kaggle's long ``row_id, fractured`` form.

    Args:
        preds: ``StudyInstanceUID`` and probability columns ``C1..C7, patient_overall``.

    Returns:
        ``row_id, fractured`` with 8 rows per study in ``TARGET_COLUMNS`` order.
    """
    missing = [c for c in ("StudyInstanceUID", *TARGET_COLUMNS) if c not in preds.columns]
    if missing:
        raise SubmissionError(f"predictions lack columns {missing}; have {list(preds.columns)}")
    return _wide_to_long(preds, np.float64)


def prior_predictions(labels: pd.DataFrame | None = None) -> np.ndarray:
    """Per-column prevalence: the constant baseline every result is compared with, and the fallback.

    Args:
        labels: train.csv-like labels; ``None`` uses the real train.csv prevalence
            (``constants.REAL_PREVALENCE``).

    Returns:
        Array ``(8,)`` in ``TARGET_COLUMNS`` order.
    """
    if labels is None:
        return np.array([REAL_PREVALENCE[c] for c in TARGET_COLUMNS], dtype=np.float64)
    missing = [c for c in TARGET_COLUMNS if c not in labels.columns]
    if missing:
        raise LayoutError(f"labels lack columns {missing}; have {list(labels.columns)}")
    if labels.empty:
        raise LayoutError("labels have no rows: no prevalence to compute")
    return labels[list(TARGET_COLUMNS)].to_numpy(np.float64).mean(axis=0)

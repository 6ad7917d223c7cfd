"""From vertebra probabilities to patient_overall, and from predictions to a safe submission.csv."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from rsna_cspine.constants import PROB_EPS, TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import ConfigError, SubmissionError
from rsna_cspine.io.files import atomic_open
from rsna_cspine.io.kaggle import check_test_frame, test_studies
from rsna_cspine.metric import prior_predictions


class PatientFit(Protocol):
    """What the ``calibrated`` rule needs of a fit (``calibration.PatientCalibration`` is one): noisy-OR in,
    calibrated probability out. A protocol, so that this module does not import the one that fits them."""

    def apply(self, noisy_or_probs: np.ndarray) -> np.ndarray: ...

logger = logging.getLogger(__name__)

#: Rules computed from the seven probabilities alone (what a CV report of OOF files can apply).
FIXED_PATIENT_RULES: tuple[str, ...] = ("noisy_or", "max", "mean_top", "blend")
#: ``calibrated`` also needs the classifiers' :class:`PatientCalibration` (fitted on their validation folds).
PATIENT_RULES: tuple[str, ...] = (*FIXED_PATIENT_RULES, "calibrated")
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", "fractured")
#: How many of the largest vertebra probabilities the ``mean_top`` rule averages.
MEAN_TOP_K = 2
_COLUMN_INDEX = {name: i for i, name in enumerate(TARGET_COLUMNS)}


def clip_probabilities(p: np.ndarray, eps: float = PROB_EPS) -> np.ndarray:
    """Clip probabilities to ``[eps, 1 - eps]`` so that no log loss is infinite.

    Args:
        p: probabilities, any shape.
        eps: margin kept from 0 and 1.
    """
    return np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)


def noisy_or(p: np.ndarray) -> np.ndarray:
    """1 − ∏(1 − p) over the last axis: the probability of at least one fracture if vertebrae were independent."""
    # In log space so that tiny p keep their sum (1 - ∏(1 - p) would round them to 0); p = 1 gives
    # log1p(-1) = -inf, whose expm1 is -1: the exact answer 1, so that warning is silenced.
    with np.errstate(divide="ignore"):
        return -np.expm1(np.log1p(-np.clip(p, 0.0, 1.0)).sum(axis=-1))


def patient_overall(
    vertebra_probs: np.ndarray,
    rule: str = "noisy_or",
    blend_weight: float = 0.5,
    calibrations: Sequence[PatientFit] = (),
) -> np.ndarray:
    """Probability that a study has any fracture, from its seven vertebra probabilities.

    Args:
        vertebra_probs: ``(..., 7)`` probabilities of C1..C7.
        rule: ``"noisy_or"`` (1 − ∏(1 − p), vertebrae independent), ``"max"``, ``"mean_top"`` (mean
            of the :data:`MEAN_TOP_K` largest) or ``"blend"``: ``blend_weight · noisy_or + (1 − blend_weight) · max``;
            or ``"calibrated"``: each of ``calibrations`` applied to noisy-OR, averaged (one per fold model).
        blend_weight: weight of noisy-OR in ``"blend"``, in [0, 1].
        calibrations: the fold models' fits for ``"calibrated"`` (:func:`fit_patient_calibration`).

    Returns:
        Array of shape ``vertebra_probs.shape[:-1]``.
    """
    p = np.asarray(vertebra_probs, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != len(VERTEBRAE):
        raise ValueError(f"vertebra_probs must have last axis {len(VERTEBRAE)} (C1..C7), got shape {p.shape}")
    if rule == "noisy_or":
        return noisy_or(p)
    if rule == "calibrated":
        if not calibrations:
            raise ConfigError("rule 'calibrated' needs at least one PatientCalibration (stored in stage-2 checkpoints)")
        plain = noisy_or(p)
        return np.mean([c.apply(plain) for c in calibrations], axis=0)
    if rule == "max":
        return p.max(axis=-1)
    if rule == "mean_top":
        return np.sort(p, axis=-1)[..., -MEAN_TOP_K:].mean(axis=-1)
    if rule == "blend":
        if not 0.0 <= blend_weight <= 1.0:
            raise ConfigError(f"blend_weight must be in [0, 1], got {blend_weight}")
        return blend_weight * noisy_or(p) + (1.0 - blend_weight) * p.max(axis=-1)
    raise ConfigError(f"unknown patient_overall rule {rule!r}; expected one of {PATIENT_RULES}")


def study_probabilities(
    vertebra_probs: np.ndarray,
    prior: np.ndarray,
    rule: str = "noisy_or",
    blend_weight: float = 0.5,
    calibrations: Sequence[PatientFit] = (),
) -> np.ndarray:
    """One study's seven classifier outputs → its eight clipped probabilities (``TARGET_COLUMNS`` order).

    Args:
        vertebra_probs: ``(7,)``; a non-finite entry (a vertebra not found) takes that vertebra's prior.
        prior: ``(8,)`` or ``(7,)`` fallback probabilities, C1 first.
        rule, blend_weight, calibrations: the patient_overall rule (:func:`patient_overall`).
    """
    probs = np.asarray(vertebra_probs, dtype=np.float64)
    filled = clip_probabilities(np.where(np.isfinite(probs), probs, np.asarray(prior, dtype=np.float64)[: len(VERTEBRAE)]))
    overall = patient_overall(filled[None], rule=rule, blend_weight=blend_weight, calibrations=calibrations)[0]
    return clip_probabilities(np.append(filled, overall))


def _valid_fallback(fallback: np.ndarray | None) -> np.ndarray:
    prior = prior_predictions(None) if fallback is None else np.asarray(fallback, dtype=np.float64)
    if prior.shape != (len(TARGET_COLUMNS),) or not np.isfinite(prior).all() or (prior < 0).any() or (prior > 1).any():
        raise SubmissionError(f"fallback must be 8 finite probabilities in TARGET_COLUMNS order, got {prior!r}")
    return prior


def build_submission(
    test_csv: pd.DataFrame,
    predictions: dict[str, np.ndarray],
    fallback: np.ndarray | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Build submission rows from test.csv and per-study predictions; never incomplete.

    Rows are exactly test.csv's rows in its order: each row takes test.csv's ``row_id`` and the
    prediction of its ``StudyInstanceUID`` for its ``prediction_type``. A study missing from
    ``predictions``, or whose prediction has a non-finite or out-of-[0, 1] value, gets ``fallback``
    for all its rows.

    Args:
        test_csv: the test.csv table (``StudyInstanceUID``, ``prediction_type``, ``row_id``).
        predictions: StudyInstanceUID → ``(8,)`` probabilities in ``TARGET_COLUMNS`` order.
        fallback: ``(8,)`` probabilities for studies without a usable prediction; default the real
            train.csv prevalence.

    Returns:
        ``(submission, fallback_uids)``: ``row_id, fractured`` with every value finite and in
        ``[PROB_EPS, 1 - PROB_EPS]``, and the studies that got the fallback, in test.csv order.
    """
    test = check_test_frame(test_csv, source="test.csv table")
    prior = _valid_fallback(fallback)
    uids = test_studies(test)
    table = np.empty((len(uids), len(TARGET_COLUMNS)), dtype=np.float64)
    fallback_uids: list[str] = []
    for i, uid in enumerate(uids):
        probs = predictions.get(uid)
        if probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if probs.shape != (len(TARGET_COLUMNS),):
                raise SubmissionError(
                    f"prediction of study {uid} has shape {probs.shape}; expected (8,) in order {TARGET_COLUMNS}"
                )
        if probs is None or not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
            fallback_uids.append(uid)
            probs = prior
        table[i] = probs
    if fallback_uids:
        logger.warning(
            "%d of %d studies use the fallback prediction, e.g. %s", len(fallback_uids), len(uids), fallback_uids[:3]
        )
    unused = len(set(predictions) - set(uids))
    if unused:
        logger.info("%d predicted studies are not in test.csv and were left out", unused)
    study_index = pd.Index(uids).get_indexer(test["StudyInstanceUID"])
    column_index = test["prediction_type"].map(_COLUMN_INDEX).to_numpy()
    submission = pd.DataFrame(
        {"row_id": test["row_id"].to_numpy(), "fractured": clip_probabilities(table[study_index, column_index])}
    )
    return submission, fallback_uids


def _check_submission(df: pd.DataFrame, path: Path, test_csv: pd.DataFrame | None) -> pd.DataFrame:
    if list(df.columns) != list(SUBMISSION_COLUMNS):
        raise SubmissionError(f"columns must be exactly {list(SUBMISSION_COLUMNS)}, got {list(df.columns)}", path)
    if df.empty:
        raise SubmissionError("submission has no rows", path)
    df = df.assign(row_id=df["row_id"].astype(str), fractured=pd.to_numeric(df["fractured"], errors="coerce"))
    duplicated = df["row_id"][df["row_id"].duplicated()].unique()
    if len(duplicated):
        raise SubmissionError(f"duplicated row_ids {list(duplicated[:5])} ({len(duplicated)} in all)", path)
    values = df["fractured"].to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        examples = [f"{rid}={v}" for rid, v in zip(df["row_id"][bad][:5], values[bad][:5])]
        raise SubmissionError(f"{bad.sum()} values not finite probabilities in [0, 1], e.g. {examples}", path)
    if test_csv is not None:
        expected = check_test_frame(test_csv, source="test.csv table")["row_id"]
        missing = expected[~expected.isin(df["row_id"])].tolist()
        extra = df["row_id"][~df["row_id"].isin(expected)].tolist()
        if missing or extra:
            raise SubmissionError(
                f"rows differ from test.csv: {len(missing)} missing (e.g. {missing[:5]}), "
                f"{len(extra)} extra (e.g. {extra[:5]})",
                path,
            )
        df = df.set_index("row_id").loc[expected.to_numpy()].reset_index()
    return df.assign(fractured=clip_probabilities(df["fractured"].to_numpy()))


def write_submission(df: pd.DataFrame, path: str | Path, test_csv: pd.DataFrame | None = None) -> Path:
    """Validate a submission and write it atomically (an interrupted run never leaves a partial file).

    Args:
        df: exactly the columns ``row_id, fractured``.
        path: destination CSV; its folder is created if needed.
        test_csv: when given, the rows must be exactly test.csv's; they are written in its order.

    Returns:
        The written path.

    Raises:
        SubmissionError: wrong columns, no rows, duplicated row_ids, non-finite or out-of-[0, 1]
            values, rows missing from or absent in test.csv.
    """
    path = Path(path)
    checked = _check_submission(df, path, test_csv)
    with atomic_open(path, "w") as fh:
        checked.to_csv(fh, index=False)
    logger.info("wrote %d rows to %s", len(checked), path)
    return path

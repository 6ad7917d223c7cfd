"""Platt scalings fitted on a stage-2 fold's validation studies: one for the vertebra probabilities, one for
patient_overall, each stored in the fold's checkpoint and applied by ``predict``.

Why both: a model trained on a re-weighted or augmented stream (the metric's 2:1 positive weight, fracture
copy-paste turning intact training vertebrae into fractured ones) learns a base rate that is not the data's,
and noisy-OR over seven such probabilities inherits the bias. Validation measures both shifts; a
two-parameter logistic fit per level corrects them without changing any ranking (AUC). scikit-learn's
``LogisticRegression`` does the fitting, weighted as the competition metric weighs each row, so the fit
minimises the metric's own log loss.

Scoring validation studies with a fit on those same studies would flatter every epoch alike, so the
validation score and the out-of-fold files use *cross-fitted* values (:func:`cross_fit_vertebra_probabilities`,
:func:`cross_fit_patient_overall`): each study's value comes from a fit on the other studies of its fold.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit, logit

from rsna_cspine.aggregate import clip_probabilities, noisy_or
from rsna_cspine.constants import PATIENT_WEIGHTS, VERTEBRA_WEIGHTS, VERTEBRAE

#: Splits of the cross-fits (at most one per study).
CROSS_FIT_SPLITS = 10
#: A vertebra fit needs at least this many fractured and this many intact validation vertebrae; with fewer the
#: slope and offset would follow a handful of rows, and the model's own probabilities are kept.
MIN_VERTEBRA_CLASS_COUNT = 5


def _fit_platt(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(logit(clip_probabilities(probs))[:, None], labels.astype(int), sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


@dataclass(frozen=True)
class PatientCalibration:
    """Platt scaling of the noisy-OR patient probability, fitted on one fold's validation studies.

    ``patient_overall = sigmoid(slope · logit(noisy_or) + intercept)``. Noisy-OR treats the seven
    vertebrae as independent and inherits their bias, so on its own it is miscalibrated in a way
    validation can measure.

    Attributes:
        slope: weight of the noisy-OR logit (0 when the validation studies were all of one class).
        intercept: logit offset.
        n_studies: validation studies it was fitted on.
        n_positive: of which had a fracture.
    """

    slope: float
    intercept: float
    n_studies: int
    n_positive: int

    def apply(self, noisy_or_probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from noisy-OR probabilities (any shape; clipped to ``PROB_EPS`` first)."""
        return expit(self.slope * logit(clip_probabilities(noisy_or_probs)) + self.intercept)

    def to_dict(self) -> dict[str, float | int]:
        """Plain values, for a checkpoint's ``extra``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, float | int]) -> PatientCalibration:
        """Inverse of :meth:`to_dict`."""
        return cls(float(values["slope"]), float(values["intercept"]), int(values["n_studies"]), int(values["n_positive"]))


@dataclass(frozen=True)
class VertebraCalibration:
    """Platt scaling of one stage-2 model's vertebra probabilities (C1–C7 pooled), fitted on its validation fold.

    ``p = sigmoid(slope · logit + intercept)``, applied to the model's logit before the fold models are
    averaged. ``slope = 1, intercept = 0`` (:meth:`identity`) keeps the model's own probabilities.

    Attributes:
        slope: weight of the model's logit.
        intercept: logit offset.
        n_vertebrae: validation vertebrae it was fitted on.
        n_positive: of which were fractured.
    """

    slope: float
    intercept: float
    n_vertebrae: int
    n_positive: int

    @classmethod
    def identity(cls, n_vertebrae: int = 0, n_positive: int = 0) -> VertebraCalibration:
        """The calibration that changes nothing (too few validation vertebrae of a class to fit)."""
        return cls(1.0, 0.0, n_vertebrae, n_positive)

    def apply_to_logits(self, logits: Any) -> Any:
        """Calibrated logits from the model's logits (numpy arrays or torch tensors)."""
        return logits * self.slope + self.intercept

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from the model's probabilities (any shape; clipped to ``PROB_EPS`` first)."""
        return expit(self.apply_to_logits(logit(clip_probabilities(probs))))

    def to_dict(self) -> dict[str, float | int]:
        """Plain values, for a checkpoint's ``extra``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, float | int]) -> VertebraCalibration:
        """Inverse of :meth:`to_dict`."""
        return cls(float(values["slope"]), float(values["intercept"]), int(values["n_vertebrae"]), int(values["n_positive"]))


def fit_patient_calibration(vertebra_probs: np.ndarray, patient_labels: np.ndarray) -> PatientCalibration:
    """Fit :class:`PatientCalibration` on validation predictions, weighted as the metric weighs patients.

    When every study is of one class there is nothing to regress against: the result is the constant
    ``(positives + 0.5) / (studies + 1)`` (Jeffreys), near the observed rate but never exactly 0 or 1.

    Args:
        vertebra_probs: ``(n, 7)`` the model's vertebra probabilities (prior-filled where not found).
        patient_labels: ``(n,)`` 0/1 patient_overall truth.

    Raises:
        ValueError: shapes that do not match, or no studies.
    """
    probs = np.asarray(vertebra_probs, dtype=np.float64)
    labels = np.asarray(patient_labels, dtype=np.float64).ravel()
    if probs.ndim != 2 or probs.shape[1] != len(VERTEBRAE) or len(probs) != len(labels) or not len(labels):
        raise ValueError(f"need (n, {len(VERTEBRAE)}) probabilities and n labels, n > 0; got {probs.shape} and {labels.shape}")
    n, positives = len(labels), int(labels.sum())
    if positives in (0, n):
        rate = (positives + 0.5) / (n + 1.0)
        return PatientCalibration(0.0, float(logit(rate)), n, positives)
    weights = np.where(labels > 0.5, PATIENT_WEIGHTS[1], PATIENT_WEIGHTS[0])
    return PatientCalibration(*_fit_platt(noisy_or(probs), labels, weights), n, positives)


def fit_vertebra_calibration(probs: np.ndarray, labels: np.ndarray) -> VertebraCalibration:
    """Fit :class:`VertebraCalibration` on validation vertebrae, weighted as the metric weighs vertebrae.

    Args:
        probs: ``(m,)`` the model's probabilities of the validation vertebrae it scored.
        labels: ``(m,)`` their 0/1 truth.

    Returns:
        The fit; :meth:`VertebraCalibration.identity` with fewer than :data:`MIN_VERTEBRA_CLASS_COUNT`
        fractured or intact vertebrae.

    Raises:
        ValueError: shapes that do not match.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(p) != len(y):
        raise ValueError(f"need as many labels as probabilities; got {len(p)} and {len(y)}")
    positives = int(y.sum())
    if min(positives, len(y) - positives) < MIN_VERTEBRA_CLASS_COUNT:
        return VertebraCalibration.identity(len(y), positives)
    weights = np.where(y > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    return VertebraCalibration(*_fit_platt(p, y, weights), len(y), positives)


def _study_splits(studies: Sequence[str], n_splits: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(fit, held)`` boolean masks over ``studies``: every distinct study is held out once. The split
    depends on the set of UIDs only, not on their order or on how often each appears."""
    from sklearn.model_selection import KFold

    uids = np.asarray(studies, dtype=str)
    distinct = np.unique(uids)  # sorted
    splitter = KFold(n_splits=min(n_splits, len(distinct)), shuffle=True, random_state=0)
    for _, held_rows in splitter.split(distinct):
        held = np.isin(uids, distinct[held_rows])
        yield ~held, held


def cross_fit_patient_overall(
    vertebra_probs: np.ndarray, patient_labels: np.ndarray, studies: Sequence[str], n_splits: int = CROSS_FIT_SPLITS
) -> np.ndarray:
    """The ``calibrated`` patient_overall of scored studies, each from a fit that never saw its own label.

    Args:
        vertebra_probs: ``(n, 7)`` vertebra probabilities.
        patient_labels: ``(n,)`` 0/1 patient_overall truth.
        studies: ``n`` StudyInstanceUIDs (fix the split).
        n_splits: number of splits (fewer when there are fewer studies).

    Returns:
        ``(n,)`` probabilities; plain noisy-OR when there are fewer than two studies (nothing to fit on).
    """
    probs = np.asarray(vertebra_probs, dtype=np.float64)
    labels = np.asarray(patient_labels, dtype=np.float64).ravel()
    if len(studies) != len(labels) or probs.shape != (len(labels), len(VERTEBRAE)):
        raise ValueError(f"need (n, {len(VERTEBRAE)}) probabilities, n labels and n studies; got {probs.shape}, "
                         f"{labels.shape}, {len(studies)}")
    plain = noisy_or(probs)
    if len(labels) < 2:
        return plain
    out = np.empty(len(labels))
    for fit, held in _study_splits(studies, n_splits):
        out[held] = fit_patient_calibration(probs[fit], labels[fit]).apply(plain[held])
    return out


def cross_fit_vertebra_probabilities(
    probs: np.ndarray, labels: np.ndarray, studies: Sequence[str], n_splits: int = CROSS_FIT_SPLITS
) -> np.ndarray:
    """Calibrated probabilities of validation vertebrae, each from a fit on the *other studies'* vertebrae.

    Args:
        probs: ``(m,)`` the model's probabilities, one per scored vertebra.
        labels: ``(m,)`` their 0/1 truth.
        studies: ``m`` StudyInstanceUIDs, the study of each vertebra (the split keeps a study's vertebrae together).
        n_splits: number of splits (fewer when there are fewer studies).

    Returns:
        ``(m,)`` probabilities; the model's own with fewer than two studies.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if not len(p) == len(y) == len(studies):
        raise ValueError(f"need m probabilities, labels and studies; got {len(p)}, {len(y)}, {len(studies)}")
    out = clip_probabilities(p)
    if len(set(studies)) < 2:
        return out
    for fit, held in _study_splits(studies, n_splits):
        out[held] = fit_vertebra_calibration(p[fit], y[fit]).apply(p[held])
    return out

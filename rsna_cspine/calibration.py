"""Platt scalings fitted on a stage-2 fold's validation studies: one for the vertebra probabilities, one for
patient_overall, each stored in the fold's checkpoint and applied by ``predict``.

Why both: a model trained on a re-weighted or augmented stream (the metric's 2:1 positive weight, fracture
copy-paste turning intact training vertebrae into fractured ones) learns a base rate that is not the data's,
and noisy-OR over seven such probabilities inherits the bias. Validation measures both shifts. The patient
fit is a two-parameter logistic regression. The vertebra fit has a slope and an offset shared by C1–C7 plus
each vertebra's own deviation from them, shrunk towards zero by an L2 penalty (:data:`LEVEL_SHRINKAGE_C`):
copy-paste inflates every vertebra's base rate alike, but the model can only take the inflation back where it
sees the fractures, so a vertebra whose fractures it cannot see keeps the inflated rate (the demo's C1: mean
probability 0.44–0.72 against a fracture rate of 0.13). Because the deviations move vertebrae against each
other, the vertebra fit changes the pooled ranking (AUC); within one vertebra the ranking stays the model's
own as long as that vertebra's slope stays positive, which the shrinkage towards the shared slope keeps it
(0.3–1.7 in the demo runs of benchmarks/results/evidence.md).
scikit-learn's ``LogisticRegression`` does the fitting, weighted as the competition metric weighs each row,
so the fit minimises the metric's own log loss.

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
#: Inverse L2 strength on each vertebra's deviation from the shared slope and offset (scikit-learn's ``C``:
#: the penalty weighs less as validation grows). Picked among 0.1, 0.3, 1 and 3 on the held-out test studies of
#: three demo runs (benchmarks/results/evidence.md, "Per-vertebra calibration").
LEVEL_SHRINKAGE_C = 0.3
#: Scale of the shared slope's feature column: its coefficient, and so its share of the L2 penalty, is this
#: much smaller, so the penalty shrinks the per-vertebra deviations and not the shared slope.
_UNSHRUNK = 100.0


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
    """Platt scaling of one stage-2 model's vertebra probabilities, fitted on its validation fold.

    ``p = sigmoid((slope + level_slope[v]) · logit + intercept + level_intercept[v])`` for a stack of vertebra
    ``v`` (0 = C1), applied to the model's logit before the fold models are averaged. Fits stored before the
    per-vertebra terms existed have none (empty tuples) and are the pooled fit. ``slope = 1, intercept = 0``
    without level terms (:meth:`identity`) keeps the model's own probabilities.

    Attributes:
        slope: weight of the model's logit, shared by C1–C7.
        intercept: logit offset, shared.
        n_vertebrae: validation vertebrae it was fitted on.
        n_positive: of which were fractured.
        level_slope: ``()`` or seven deviations of each vertebra's slope from ``slope``.
        level_intercept: ``()`` or seven deviations of each vertebra's offset from ``intercept``.
    """

    slope: float
    intercept: float
    n_vertebrae: int
    n_positive: int
    level_slope: tuple[float, ...] = ()
    level_intercept: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if {len(self.level_slope), len(self.level_intercept)} not in ({0}, {len(VERTEBRAE)}):
            raise ValueError(f"level terms must be empty or {len(VERTEBRAE)} each, got {len(self.level_slope)} "
                             f"and {len(self.level_intercept)}")

    @classmethod
    def identity(cls, n_vertebrae: int = 0, n_positive: int = 0) -> VertebraCalibration:
        """The calibration that changes nothing (too few validation vertebrae of a class to fit)."""
        return cls(1.0, 0.0, n_vertebrae, n_positive)

    @property
    def per_vertebra(self) -> bool:
        """Whether the fit has per-vertebra terms (then :meth:`apply` needs each row's vertebra)."""
        return bool(self.level_slope)

    def apply_to_logits(self, logits: Any, vertebrae: Any = None) -> Any:
        """Calibrated logits from the model's logits (numpy arrays or torch tensors).

        Args:
            logits: ``(B,)`` the model's logits.
            vertebrae: ``(B,)`` 0-based vertebra of each row (integer array or tensor); needed when the fit
                has per-vertebra terms.

        Raises:
            ValueError: a per-vertebra fit without ``vertebrae``.
        """
        if not self.per_vertebra:
            return logits * self.slope + self.intercept
        if vertebrae is None:
            raise ValueError("this vertebra calibration has a term per vertebra: pass each row's vertebra")
        if hasattr(logits, "new_tensor"):  # torch: index tensors of the logits' dtype and device
            slopes, offsets = logits.new_tensor(self.level_slope), logits.new_tensor(self.level_intercept)
            which = vertebrae.to(logits.device).long() if hasattr(vertebrae, "long") else logits.new_tensor(vertebrae).long()
        else:
            slopes, offsets, which = np.asarray(self.level_slope), np.asarray(self.level_intercept), np.asarray(vertebrae)
        return logits * (self.slope + slopes[which]) + self.intercept + offsets[which]

    def apply(self, probs: np.ndarray, vertebrae: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities from the model's probabilities (clipped to ``PROB_EPS`` first).

        Args:
            probs: ``(B,)`` the model's probabilities.
            vertebrae: ``(B,)`` 0-based vertebra of each; needed when the fit has per-vertebra terms.
        """
        return expit(self.apply_to_logits(logit(clip_probabilities(probs)), vertebrae))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a checkpoint's ``extra``."""
        values = asdict(self)
        values["level_slope"], values["level_intercept"] = list(self.level_slope), list(self.level_intercept)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VertebraCalibration:
        """Inverse of :meth:`to_dict`; fits stored without per-vertebra terms load as pooled fits."""
        return cls(float(values["slope"]), float(values["intercept"]), int(values["n_vertebrae"]), int(values["n_positive"]),
                   tuple(float(v) for v in values.get("level_slope", ())),
                   tuple(float(v) for v in values.get("level_intercept", ())))


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


def fit_vertebra_calibration(probs: np.ndarray, labels: np.ndarray, vertebrae: np.ndarray | None = None) -> VertebraCalibration:
    """Fit :class:`VertebraCalibration` on validation vertebrae, weighted as the metric weighs vertebrae.

    Args:
        probs: ``(m,)`` the model's probabilities of the validation vertebrae it scored.
        labels: ``(m,)`` their 0/1 truth.
        vertebrae: ``(m,)`` 0-based vertebra of each (0 = C1): adds each vertebra's deviation from the shared
            slope and offset, shrunk towards zero (:data:`LEVEL_SHRINKAGE_C`). None: one pooled fit.

    Returns:
        The fit; :meth:`VertebraCalibration.identity` with fewer than :data:`MIN_VERTEBRA_CLASS_COUNT`
        fractured or intact vertebrae.

    Raises:
        ValueError: shapes that do not match, or a vertebra index outside 0..6.
    """
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(p) != len(y) or (vertebrae is not None and len(vertebrae) != len(y)):
        raise ValueError(f"need as many labels (and vertebrae) as probabilities; got {len(p)} and {len(y)}")
    positives = int(y.sum())
    if min(positives, len(y) - positives) < MIN_VERTEBRA_CLASS_COUNT:
        return VertebraCalibration.identity(len(y), positives)
    weights = np.where(y > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    if vertebrae is None:
        return VertebraCalibration(*_fit_platt(p, y, weights), len(y), positives)
    which = np.asarray(vertebrae, dtype=np.int64).ravel()
    if which.min() < 0 or which.max() >= len(VERTEBRAE):
        raise ValueError(f"vertebra indices must be 0..{len(VERTEBRAE) - 1}, got {which.min()}..{which.max()}")
    z = logit(clip_probabilities(p))[:, None]
    one_hot = np.eye(len(VERTEBRAE))[which]
    # The shared slope's column is scaled up so that the penalty meant for the deviations barely touches it
    # (the intercept is never penalised): only what sets one vertebra apart is shrunk.
    features = np.hstack([z * _UNSHRUNK, z * one_hot, one_hot])
    model = LogisticRegression(C=LEVEL_SHRINKAGE_C, max_iter=1000).fit(features, y.astype(int), sample_weight=weights)
    coef = model.coef_[0]
    n = len(VERTEBRAE)
    return VertebraCalibration(float(coef[0] * _UNSHRUNK), float(model.intercept_[0]), len(y), positives,
                               tuple(float(c) for c in coef[1 : 1 + n]), tuple(float(c) for c in coef[1 + n :]))


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
    probs: np.ndarray, labels: np.ndarray, studies: Sequence[str], vertebrae: np.ndarray | None = None,
    n_splits: int = CROSS_FIT_SPLITS,
) -> np.ndarray:
    """Calibrated probabilities of validation vertebrae, each from a fit on the *other studies'* vertebrae.

    Args:
        probs: ``(m,)`` the model's probabilities, one per scored vertebra.
        labels: ``(m,)`` their 0/1 truth.
        studies: ``m`` StudyInstanceUIDs, the study of each vertebra (the split keeps a study's vertebrae together).
        vertebrae: ``(m,)`` 0-based vertebra of each, for the per-vertebra fit (None: pooled fits).
        n_splits: number of splits (fewer when there are fewer studies).

    Returns:
        ``(m,)`` probabilities; the model's own with fewer than two studies.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if not len(p) == len(y) == len(studies) or (vertebrae is not None and len(vertebrae) != len(p)):
        raise ValueError(f"need m probabilities, labels, studies (and vertebrae); got {len(p)}, {len(y)}, {len(studies)}")
    which = None if vertebrae is None else np.asarray(vertebrae, dtype=np.int64).ravel()
    out = clip_probabilities(p)
    if len(set(studies)) < 2:
        return out
    for fit, held in _study_splits(studies, n_splits):
        if which is None:
            out[held] = fit_vertebra_calibration(p[fit], y[fit]).apply(p[held])
        else:
            out[held] = fit_vertebra_calibration(p[fit], y[fit], which[fit]).apply(p[held], which[held])
    return out

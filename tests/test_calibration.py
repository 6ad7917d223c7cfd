"""Validation Platt scalings: vertebra probabilities and patient_overall, their cross-fits and the fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from rsna_cspine.aggregate import patient_overall
from rsna_cspine.calibration import (
    MIN_VERTEBRA_CLASS_COUNT,
    PatientCalibration,
    VertebraCalibration,
    cross_fit_patient_overall,
    cross_fit_vertebra_probabilities,
    fit_patient_calibration,
    fit_vertebra_calibration,
)
from rsna_cspine.constants import PATIENT_WEIGHTS, PROB_EPS, VERTEBRA_WEIGHTS
from rsna_cspine.errors import ConfigError
from rsna_cspine.metric import weighted_log_loss

PROBS = np.array([[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.5], [0.0] * 7, [0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])


def _overconfident_studies(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertebra probabilities that overstate the truth 4× in odds (a weighted, overfitted model), and labels."""
    rng = np.random.default_rng(seed)
    true_p = rng.beta(0.6, 5.0, size=(n, 7))
    fractured = rng.random((n, 7)) < true_p
    odds = 4.0 * true_p / (1.0 - true_p)
    return odds / (1.0 + odds), fractured.any(axis=1).astype(float)


def test_calibration_fitted_on_validation_beats_noisy_or_on_new_studies() -> None:
    val_probs, val_labels = _overconfident_studies(400, seed=1)
    test_probs, test_labels = _overconfident_studies(4000, seed=2)
    calibration = fit_patient_calibration(val_probs, val_labels)
    assert calibration.n_studies == 400 and calibration.n_positive == int(val_labels.sum())
    weights = np.where(test_labels > 0.5, PATIENT_WEIGHTS[1], PATIENT_WEIGHTS[0])
    plain = weighted_log_loss(test_labels, patient_overall(test_probs), weights)
    calibrated = weighted_log_loss(test_labels, patient_overall(test_probs, "calibrated", calibrations=[calibration]), weights)
    assert calibrated < plain - 0.1, (calibrated, plain)
    # Monotone in noisy-OR: the ranking of studies (patient AUC) is untouched.
    order = np.argsort(patient_overall(test_probs))
    assert np.all(np.diff(calibration.apply(patient_overall(test_probs))[order]) >= 0)


def test_calibration_through_scipy_equals_the_written_out_logit_and_sigmoid() -> None:
    """scipy.special.logit/expit against ``log(p) - log1p(-p)`` and ``1 / (1 + exp(-z))`` (the formulas they
    replaced): equal to 1e-14 over the whole clipped range, the ends and 0.5 included."""
    probs, labels = _overconfident_studies(400, seed=1)
    calibration = fit_patient_calibration(probs, labels)
    noisy_or = np.concatenate([patient_overall(_overconfident_studies(2000, seed=3)[0]),
                               np.linspace(0.0, 1.0, 10001), [PROB_EPS / 2, 1.0 - PROB_EPS / 2]])
    p = np.clip(noisy_or, PROB_EPS, 1.0 - PROB_EPS)
    z = np.log(p) - np.log1p(-p)
    expected = 1.0 / (1.0 + np.exp(-(calibration.slope * z + calibration.intercept)))
    np.testing.assert_allclose(calibration.apply(noisy_or), expected, rtol=0, atol=1e-14)
    feature = np.clip(patient_overall(probs), PROB_EPS, 1.0 - PROB_EPS)
    refit = LogisticRegression().fit(np.log(feature / (1.0 - feature))[:, None], labels.astype(int),
                                     sample_weight=np.where(labels > 0.5, PATIENT_WEIGHTS[1], PATIENT_WEIGHTS[0]))
    assert calibration.slope == pytest.approx(float(refit.coef_[0, 0]), rel=1e-6)
    assert calibration.intercept == pytest.approx(float(refit.intercept_[0]), rel=1e-6)
    one_class = fit_patient_calibration(probs, np.ones(len(probs)))
    rate = (len(probs) + 0.5) / (len(probs) + 1.0)
    assert one_class.intercept == pytest.approx(math.log(rate / (1.0 - rate)), rel=1e-14)


def test_calibration_of_one_class_is_a_smoothed_constant() -> None:
    probs = np.random.default_rng(0).random((64, 7)) * 0.3
    every = fit_patient_calibration(probs, np.ones(64))
    assert every.slope == 0.0
    np.testing.assert_allclose(every.apply(patient_overall(probs)), 64.5 / 65.0, rtol=1e-12)
    none = fit_patient_calibration(probs, np.zeros(64))
    np.testing.assert_allclose(none.apply(np.array([0.01, 0.99])), 0.5 / 65.0, rtol=1e-12)
    assert PatientCalibration.from_dict(every.to_dict()) == every


def test_calibrated_rule_averages_the_fold_fits_and_needs_one() -> None:
    first, second = PatientCalibration(1.0, 0.5, 10, 5), PatientCalibration(0.5, -1.0, 10, 4)
    noisy_or = patient_overall(PROBS[:1])
    expected = (first.apply(noisy_or) + second.apply(noisy_or)) / 2
    np.testing.assert_allclose(patient_overall(PROBS[:1], "calibrated", calibrations=[first, second]), expected)
    z = np.log(0.64 / 0.36)
    np.testing.assert_allclose(first.apply(noisy_or), 1 / (1 + np.exp(-(z + 0.5))), rtol=1e-9)
    with pytest.raises(ConfigError, match="needs at least one PatientCalibration"):
        patient_overall(PROBS, rule="calibrated")
    with pytest.raises(ValueError, match="n labels"):
        fit_patient_calibration(PROBS, np.ones(2))


def test_cross_fitted_calibration_never_sees_a_studys_own_label() -> None:
    probs, labels = _overconfident_studies(200, seed=3)
    uids = [f"1.2.{i}" for i in range(200)]
    fitted = cross_fit_patient_overall(probs, labels, uids)
    for i in (0, 17, 123):  # flipping a study's own label leaves its own value exactly as it was
        flipped = labels.copy()
        flipped[i] = 1.0 - flipped[i]
        again = cross_fit_patient_overall(probs, flipped, uids)
        assert again[i] == fitted[i] and not np.allclose(np.delete(again, i), np.delete(fitted, i))
    order = np.random.default_rng(0).permutation(200)  # the split follows the UIDs, not the row order
    np.testing.assert_allclose(cross_fit_patient_overall(probs[order], labels[order], [uids[i] for i in order]),
                               fitted[order], rtol=1e-12)
    # Still the calibration's gain over noisy-OR on these overconfident studies.
    weights = np.where(labels > 0.5, PATIENT_WEIGHTS[1], PATIENT_WEIGHTS[0])
    assert weighted_log_loss(labels, fitted, weights) < weighted_log_loss(labels, patient_overall(probs), weights) - 0.1
    np.testing.assert_allclose(cross_fit_patient_overall(probs[:1], labels[:1], uids[:1]), patient_overall(probs[:1]))


def _inflated_vertebrae(n_studies: int, seed: int, odds_factor: float = 8.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Vertebra probabilities of a model trained on a stream with ``odds_factor`` × the true fracture odds (as
    copy-paste augmentation makes one), their labels and each vertebra's study."""
    rng = np.random.default_rng(seed)
    true_p = rng.beta(0.5, 3.0, size=n_studies * 7)
    labels = (rng.random(len(true_p)) < true_p).astype(float)
    odds = odds_factor * true_p / (1.0 - true_p)
    studies = [f"1.2.{seed}.{i // 7}" for i in range(len(true_p))]
    return odds / (1.0 + odds), labels, studies


def test_vertebra_calibration_fitted_on_validation_fixes_an_inflated_base_rate_on_new_studies() -> None:
    val_p, val_y, _ = _inflated_vertebrae(60, seed=1)
    test_p, test_y, _ = _inflated_vertebrae(600, seed=2)
    fit = fit_vertebra_calibration(val_p, val_y)
    assert (fit.n_vertebrae, fit.n_positive) == (len(val_y), int(val_y.sum()))
    assert fit.intercept < -0.5  # it learned to take the inflated odds back down
    weights = np.where(test_y > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    assert weighted_log_loss(test_y, fit.apply(test_p), weights) < weighted_log_loss(test_y, test_p, weights) - 0.03
    # Monotone: the ranking (AUC) is the model's own.
    assert roc_auc_score(test_y, fit.apply(test_p)) == pytest.approx(roc_auc_score(test_y, test_p), abs=1e-12)
    # The same fit on logits (what the ensemble applies to torch logits) and on probabilities.
    clipped = np.clip(test_p, PROB_EPS, 1 - PROB_EPS)
    z = np.log(clipped / (1 - clipped))
    np.testing.assert_allclose(1 / (1 + np.exp(-fit.apply_to_logits(z))), fit.apply(test_p), rtol=1e-9)
    refit = LogisticRegression().fit(np.log(val_p / (1 - val_p))[:, None],
                                     val_y.astype(int), sample_weight=np.where(val_y > 0.5, 2.0, 1.0))
    assert fit.slope == pytest.approx(float(refit.coef_[0, 0]), rel=1e-6)
    assert fit.intercept == pytest.approx(float(refit.intercept_[0]), rel=1e-6)
    assert VertebraCalibration.from_dict(fit.to_dict()) == fit


def test_vertebra_calibration_keeps_the_model_when_a_class_is_too_rare() -> None:
    p = np.linspace(0.05, 0.95, 40)
    y = np.zeros(40)
    y[: MIN_VERTEBRA_CLASS_COUNT - 1] = 1
    fit = fit_vertebra_calibration(p, y)
    assert fit == VertebraCalibration.identity(40, MIN_VERTEBRA_CLASS_COUNT - 1)
    np.testing.assert_allclose(fit.apply(p), p, rtol=1e-12)
    with pytest.raises(ValueError, match="as many labels"):
        fit_vertebra_calibration(p, y[:3])


def test_cross_fitted_vertebrae_never_see_their_own_studys_labels() -> None:
    p, y, studies = _inflated_vertebrae(80, seed=3)
    fitted = cross_fit_vertebra_probabilities(p, y, studies)
    own = [i for i, s in enumerate(studies) if s == studies[10]]
    flipped = y.copy()
    flipped[own] = 1.0 - flipped[own]
    again = cross_fit_vertebra_probabilities(p, flipped, studies)
    np.testing.assert_array_equal(again[own], fitted[own])  # the study's own labels did not move its values
    assert not np.allclose(np.delete(again, own), np.delete(fitted, own))
    order = np.random.default_rng(0).permutation(len(p))  # the split follows the studies, not the row order
    np.testing.assert_allclose(cross_fit_vertebra_probabilities(p[order], y[order], [studies[i] for i in order]),
                               fitted[order], rtol=1e-12)
    weights = np.where(y > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    assert weighted_log_loss(y, fitted, weights) < weighted_log_loss(y, p, weights) - 0.03
    one_study = cross_fit_vertebra_probabilities(p[:7], y[:7], studies[:7])
    np.testing.assert_allclose(one_study, np.clip(p[:7], PROB_EPS, 1 - PROB_EPS))

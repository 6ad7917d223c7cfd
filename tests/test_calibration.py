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


def _one_blind_vertebra(n_studies: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """What copy-paste leaves behind: the model took the inflated base rate back for C2–C7, whose fractures it
    sees, but not for C1, whose fractures it cannot see (near-constant, high probabilities at a 10 % rate)."""
    rng = np.random.default_rng(seed)
    vertebrae = np.tile(np.arange(7), n_studies)
    true_p = np.where(vertebrae == 0, 0.1, rng.beta(0.5, 3.0, size=len(vertebrae)))
    labels = (rng.random(len(vertebrae)) < true_p).astype(float)
    probs = np.where(vertebrae == 0, rng.uniform(0.55, 0.65, size=len(vertebrae)), true_p)
    return probs, labels, vertebrae, [f"1.2.{seed}.{i // 7}" for i in range(len(vertebrae))]


def test_per_vertebra_calibration_takes_back_a_base_rate_the_model_could_not_see() -> None:
    val_p, val_y, val_v, _ = _one_blind_vertebra(60, seed=4)
    test_p, test_y, test_v, _ = _one_blind_vertebra(1000, seed=5)
    pooled, per_level = fit_vertebra_calibration(val_p, val_y), fit_vertebra_calibration(val_p, val_y, val_v)
    assert not pooled.per_vertebra and per_level.per_vertebra
    blind = test_v == 0
    # The metric weighs a fractured vertebra 2:1, so the weighted fit's aim for a 10 % rate is 0.2 / 1.1 = 0.18.
    # The pooled fit moves every vertebra alike and leaves C1 far above it; the per-vertebra fit, shrunk
    # towards the pooled one on 60 validation C1s, brings it most of the way.
    aim = 2 * 0.1 / (2 * 0.1 + 0.9)
    assert pooled.apply(test_p)[blind].mean() > 0.3
    assert abs(per_level.apply(test_p, test_v)[blind].mean() - aim) < 0.08
    # Pooled over C1–C7, intact C1s no longer outrank fractured C2–C7s: the pooled AUC and the metric's loss gain.
    calibrated = per_level.apply(test_p, test_v)
    assert roc_auc_score(test_y, calibrated) > roc_auc_score(test_y, pooled.apply(test_p)) + 0.05
    weights = np.where(test_y > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    assert weighted_log_loss(test_y, calibrated, weights) < weighted_log_loss(test_y, pooled.apply(test_p), weights) - 0.02
    # Within a vertebra whose slope stays positive the ranking is the model's own.
    for v in range(1, 7):
        rows = test_v == v
        assert per_level.slope + per_level.level_slope[v] > 0
        assert roc_auc_score(test_y[rows], calibrated[rows]) == pytest.approx(roc_auc_score(test_y[rows], test_p[rows]), abs=1e-12)


def test_per_vertebra_calibration_is_the_same_on_torch_logits_and_round_trips_through_a_checkpoint() -> None:
    import torch

    p, y, v, _ = _one_blind_vertebra(60, seed=6)
    fit = fit_vertebra_calibration(p, y, v)
    z = np.log(np.clip(p, PROB_EPS, 1 - PROB_EPS) / (1 - np.clip(p, PROB_EPS, 1 - PROB_EPS)))
    on_tensors = fit.apply_to_logits(torch.from_numpy(z).float(), torch.from_numpy(v)).double().numpy()
    np.testing.assert_allclose(on_tensors, fit.apply_to_logits(z, v), rtol=1e-5, atol=1e-5)
    assert VertebraCalibration.from_dict(fit.to_dict()) == fit
    # A fit stored before the per-vertebra terms existed loads as the pooled fit it was.
    old = {"slope": 1.2, "intercept": -1.5, "n_vertebrae": 288, "n_positive": 64}
    loaded = VertebraCalibration.from_dict(old)
    assert not loaded.per_vertebra
    np.testing.assert_allclose(loaded.apply(p), 1 / (1 + np.exp(-(1.2 * z - 1.5))), rtol=1e-9)
    with pytest.raises(ValueError, match="each row's vertebra"):
        fit.apply(p)
    with pytest.raises(ValueError, match="0..6"):
        fit_vertebra_calibration(p, y, v + 1)
    with pytest.raises(ValueError, match="empty or 7"):
        VertebraCalibration(1.0, 0.0, 1, 0, (0.0,) * 3, (0.0,) * 3)


def test_per_vertebra_cross_fit_never_sees_its_own_studys_labels() -> None:
    p, y, v, studies = _one_blind_vertebra(80, seed=7)
    fitted = cross_fit_vertebra_probabilities(p, y, studies, v)
    own = [i for i, s in enumerate(studies) if s == studies[10]]
    flipped = y.copy()
    flipped[own] = 1.0 - flipped[own]
    again = cross_fit_vertebra_probabilities(p, flipped, studies, v)
    np.testing.assert_array_equal(again[own], fitted[own])
    assert fitted[v == 0].mean() < 0.3 < p[v == 0].mean()  # C1 brought down by fits on the other studies

"""patient_overall rules, submission building and the atomic submission writer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from rsna_cspine.aggregate import (
    cross_fit_patient_overall,
    PatientCalibration,
    build_submission,
    clip_probabilities,
    fit_patient_calibration,
    patient_overall,
    write_submission,
)
from rsna_cspine.constants import PATIENT_WEIGHTS, PROB_EPS, REAL_PREVALENCE, TARGET_COLUMNS
from rsna_cspine.metric import weighted_log_loss
from rsna_cspine.errors import ConfigError, LayoutError, SubmissionError

PROBS = np.array([[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.5], [0.0] * 7, [0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])


def test_noisy_or() -> None:
    # 1 - (0.9 · 0.8 · 0.5) = 1 - 0.36; no fracture anywhere → 0; a certain fracture → 1.
    np.testing.assert_allclose(patient_overall(PROBS), [0.64, 0.0, 1.0], atol=1e-12)
    rng = np.random.default_rng(0)
    p = rng.random((20, 7))
    product = np.ones(20)
    for j in range(7):
        product *= 1 - p[:, j]
    np.testing.assert_allclose(patient_overall(p, rule="noisy_or"), 1 - product, rtol=1e-12)
    # Tiny probabilities keep their sum instead of rounding to 0.
    assert patient_overall(np.full(7, 1e-12)) == pytest.approx(7e-12, rel=1e-6)


def test_max_mean_top_and_blend() -> None:
    np.testing.assert_allclose(patient_overall(PROBS, rule="max"), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(patient_overall(PROBS, rule="mean_top"), [(0.5 + 0.2) / 2, 0.0, (1.0 + 0.3) / 2])
    # blend: 0.25 · noisy_or + 0.75 · max.
    np.testing.assert_allclose(
        patient_overall(PROBS, rule="blend", blend_weight=0.25), [0.25 * 0.64 + 0.75 * 0.5, 0.0, 1.0]
    )


def test_patient_overall_refusals() -> None:
    with pytest.raises(ConfigError, match="unknown patient_overall rule"):
        patient_overall(PROBS, rule="median")
    with pytest.raises(ValueError, match="last axis 7"):
        patient_overall(np.zeros((2, 8)))
    with pytest.raises(ConfigError, match="blend_weight"):
        patient_overall(PROBS, rule="blend", blend_weight=1.5)


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


def test_clip_probabilities() -> None:
    np.testing.assert_array_equal(clip_probabilities([0.0, 0.3, 1.0]), [PROB_EPS, 0.3, 1 - PROB_EPS])


def _test_csv(uids: list[str], shuffle_seed: int | None = None) -> pd.DataFrame:
    rows = [(f"{u}_{t}", u, t) for u in uids for t in TARGET_COLUMNS]
    frame = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    if shuffle_seed is not None:
        frame = frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    return frame


def test_rows_follow_test_csv_order() -> None:
    uids = ["1.2.826.0.1.3680043.10197", "1.2.826.0.1.3680043.10454", "1.2.826.0.1.3680043.10690"]
    test = _test_csv(uids, shuffle_seed=4)  # studies and types interleaved
    rng = np.random.default_rng(5)
    predictions = {uid: rng.uniform(0.05, 0.95, 8) for uid in reversed(uids)}
    submission, fallbacks = build_submission(test, predictions)
    assert fallbacks == []
    assert submission.row_id.tolist() == test.row_id.tolist()
    for row, (uid, kind) in zip(submission.itertuples(), zip(test.StudyInstanceUID, test.prediction_type)):
        assert row.fractured == predictions[uid][TARGET_COLUMNS.index(kind)]


def test_missing_or_non_finite_study_gets_fallback() -> None:
    uids = ["1.1", "2.2", "3.3", "4.4"]
    test = _test_csv(uids)
    fallback = np.linspace(0.1, 0.8, 8)
    predictions = {
        "1.1": np.full(8, 0.3),
        "3.3": np.array([0.2] * 7 + [np.nan]),
        "4.4": np.array([0.0] * 7 + [1.0]),  # extremes are clipped, not replaced
        "9.9": np.full(8, 0.9),  # not in test.csv: ignored
    }
    submission, fallbacks = build_submission(test, predictions, fallback=fallback)
    assert fallbacks == ["2.2", "3.3"]
    values = submission.set_index("row_id").fractured
    for uid in ("2.2", "3.3"):
        np.testing.assert_allclose([values[f"{uid}_{t}"] for t in TARGET_COLUMNS], fallback)
    assert values["1.1_C4"] == 0.3
    assert values["4.4_C1"] == PROB_EPS and values["4.4_patient_overall"] == 1 - PROB_EPS
    assert len(submission) == 32 and np.isfinite(submission.fractured).all()
    # Default fallback: the real train.csv prevalence.
    default, fallbacks = build_submission(test, {})
    assert fallbacks == uids
    assert default.set_index("row_id").fractured["2.2_C7"] == pytest.approx(REAL_PREVALENCE["C7"])


def test_build_submission_refusals() -> None:
    test = _test_csv(["1.1"])
    with pytest.raises(SubmissionError, match=r"study 1\.1 has shape \(7,\)"):
        build_submission(test, {"1.1": np.zeros(7)})
    with pytest.raises(SubmissionError, match="fallback"):
        build_submission(test, {}, fallback=np.full(8, np.nan))
    bad_type = test.copy()
    bad_type.loc[0, "prediction_type"] = "C0"
    with pytest.raises(LayoutError, match="unknown prediction_type"):
        build_submission(bad_type, {})


def test_written_file_reads_back_equal(tmp_path) -> None:
    test = _test_csv(["1.2.3", "1.2.4"], shuffle_seed=1)
    rng = np.random.default_rng(6)
    submission, _ = build_submission(test, {"1.2.3": rng.random(8), "1.2.4": rng.random(8)})
    path = write_submission(submission, tmp_path / "out" / "submission.csv", test_csv=test)
    back = pd.read_csv(path, dtype={"row_id": str})
    pd.testing.assert_frame_equal(back, submission)
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left behind
    # Rows given in another order are written in test.csv order.
    write_submission(submission.iloc[::-1], path, test_csv=test)
    assert pd.read_csv(path, dtype={"row_id": str}).row_id.tolist() == test.row_id.tolist()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.assign(extra=1), "columns must be exactly"),
        (lambda df: pd.concat([df, df.iloc[[0]]]), "duplicated row_ids"),
        (lambda df: df.assign(fractured=df.fractured.where(df.index != 3, np.nan)), "not finite"),
        (lambda df: df.assign(fractured=df.fractured.where(df.index != 3, 1.2)), "not finite"),
        (lambda df: df.iloc[1:], "1 missing"),
        (lambda df: pd.concat([df, pd.DataFrame({"row_id": ["8.8_C1"], "fractured": [0.5]})]), "1 extra"),
        (lambda df: df.iloc[:0], "no rows"),
    ],
)
def test_write_submission_validation(tmp_path, mutate, message: str) -> None:
    test = _test_csv(["1.2.3"])
    good, _ = build_submission(test, {"1.2.3": np.full(8, 0.4)})
    path = write_submission(good, tmp_path / "submission.csv", test_csv=test)
    before = path.read_bytes()
    with pytest.raises(SubmissionError, match=message) as info:
        write_submission(mutate(good.copy()), path, test_csv=test)
    assert "submission.csv" in str(info.value)
    assert path.read_bytes() == before  # a refused write leaves the previous file intact


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch) -> None:
    test = _test_csv(["1.2.3"])
    good, _ = build_submission(test, {"1.2.3": np.full(8, 0.4)})
    path = write_submission(good, tmp_path / "submission.csv")
    before = path.read_bytes()

    def crash_halfway(self, handle, **kwargs):  # the disk fills up after a few bytes
        handle.write("row_id,fract")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_halfway)
    with pytest.raises(OSError, match="No space"):
        write_submission(good.assign(fractured=0.9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]

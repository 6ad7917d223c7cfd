"""patient_overall rules, submission building and the atomic submission writer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rsna_cspine.aggregate import build_submission, clip_probabilities, patient_overall, write_submission
from rsna_cspine.constants import PROB_EPS, REAL_PREVALENCE, TARGET_COLUMNS
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


def test_study_probabilities_fill_missing_vertebrae_with_the_prior_and_clip_all_eight() -> None:
    from rsna_cspine.aggregate import noisy_or, study_probabilities

    prior = np.linspace(0.05, 0.4, 8)
    probs = np.array([0.0, np.nan, 0.3, 1.0, 0.2, np.nan, 0.1])
    row = study_probabilities(probs, prior)
    filled = np.clip([0.0, prior[1], 0.3, 1.0, 0.2, prior[5], 0.1], PROB_EPS, 1 - PROB_EPS)
    np.testing.assert_allclose(row[:7], filled)
    assert row[7] == pytest.approx(1 - PROB_EPS)  # a certain vertebra makes the study certain, clipped
    np.testing.assert_allclose(study_probabilities(probs, prior[:7], rule="max")[7], filled.max())
    assert study_probabilities(np.full(7, np.nan), prior)[7] == pytest.approx(noisy_or(prior[:7]))

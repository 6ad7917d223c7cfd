"""The competition metric: hand arithmetic, sklearn agreement, refusals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss

from rsna_cspine.constants import PROB_EPS, REAL_PREVALENCE, TARGET_COLUMNS
from rsna_cspine.errors import SubmissionError
from rsna_cspine.metric import (
    FORMS,
    column_log_losses,
    competition_score,
    competition_weights,
    labels_to_solution,
    predictions_to_submission,
    prior_predictions,
    score_arrays,
    weighted_log_loss,
)

LN2 = math.log(2.0)
# Competition weights written out independently of the code: vertebrae 1/2, patient_overall 7/14.
NEG = np.array([1, 1, 1, 1, 1, 1, 1, 7], dtype=float)
POS = np.array([2, 2, 2, 2, 2, 2, 2, 14], dtype=float)


def _frames(uids: list[str], y: np.ndarray, p: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    wide_y = pd.DataFrame(y, columns=list(TARGET_COLUMNS)).assign(StudyInstanceUID=uids)
    wide_p = pd.DataFrame(p, columns=list(TARGET_COLUMNS)).assign(StudyInstanceUID=uids)
    return labels_to_solution(wide_y), predictions_to_submission(wide_p)


@pytest.fixture
def two_studies() -> tuple[np.ndarray, np.ndarray]:
    # Study A: C1 fractured (so patient_overall = 1); study B: no fracture.
    y = np.array([[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    p = np.array([[0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.5]])
    return y, p


def test_hand_computed_two_study_example(two_studies: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = two_studies
    ln125, ln109 = math.log(1 / 0.8), math.log(1 / 0.9)  # -ln 0.8, -ln 0.9
    # Study A: C1 y=1 p=.8 w=2; C2..C7 y=0 p=.1 w=1 (x6); overall y=1 p=.9 w=14  → Σw = 22.
    loss_a = (2 * ln125 + 6 * ln109 + 14 * ln109) / 22
    # Study B: C1..C7 y=0 p=.2 w=1 (x7); overall y=0 p=.5 w=7  → Σw = 14.
    loss_b = (7 * ln125 + 7 * LN2) / 14
    expected_study = (loss_a + loss_b) / 2
    expected_global = (2 * ln125 + 20 * ln109 + 7 * ln125 + 7 * LN2) / 36
    # Column form: C1 = (2·ln1.25 [A] + 1·ln1.25 [B]) / 3; C2..C7 = (ln(10/9) + ln1.25) / 2 each;
    # overall = (14·ln(10/9) + 7·ln2) / 21; then (C1 + … + C7 + 7·overall) / 14.
    c1 = (2 * ln125 + ln125) / 3
    c_other = (ln109 + ln125) / 2
    overall = (14 * ln109 + 7 * LN2) / 21
    expected_column = (c1 + 6 * c_other + 7 * overall) / 14

    expected = {"study": expected_study, "global": expected_global, "column": expected_column}
    solution, submission = _frames(["1.2.3", "1.2.4"], y, p)
    for form, value in expected.items():
        assert score_arrays(y, p, form) == pytest.approx(value, rel=1e-12)
        assert competition_score(solution, submission, form) == pytest.approx(value, rel=1e-12)
    assert competition_score(solution, submission) == pytest.approx(expected_study, rel=1e-12)
    # The three forms genuinely differ on this example.
    assert len({round(v, 9) for v in expected.values()}) == 3


def test_agrees_with_sklearn_weighted_log_loss() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((40, 8)) < 0.3).astype(int)
    p = rng.uniform(0.01, 0.99, size=(40, 8))
    w = NEG + y * (POS - NEG)
    assert score_arrays(y, p, "global") == pytest.approx(log_loss(y.ravel(), p.ravel(), sample_weight=w.ravel()))
    per_study = [log_loss(y[i], p[i], sample_weight=w[i], labels=[0, 1]) for i in range(len(y))]
    assert score_arrays(y, p, "study") == pytest.approx(np.mean(per_study))
    per_column = np.array([log_loss(y[:, j], p[:, j], sample_weight=w[:, j], labels=[0, 1]) for j in range(8)])
    np.testing.assert_allclose(column_log_losses(y, p), per_column)
    assert score_arrays(y, p, "column") == pytest.approx((per_column[:7].sum() + 7 * per_column[7]) / 14)
    assert weighted_log_loss(y[:, 0], p[:, 0], w[:, 0]) == pytest.approx(per_column[0])


def _written_out_score(y: np.ndarray, p: np.ndarray, form: str) -> float:
    """The metric as it was written by hand before scikit-learn computed it: clipped BCE, bincount reductions."""
    q = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
    loss = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
    weight = NEG + y * (POS - NEG)
    if form == "global":
        return float((loss * weight).sum() / weight.sum())
    if form == "study":
        return float(((loss * weight).sum(axis=1) / weight.sum(axis=1)).mean())
    columns = (loss * weight).sum(axis=0) / weight.sum(axis=0)
    return float((columns[:7].sum() + 7 * columns[7]) / 14)


@pytest.mark.parametrize("form", FORMS)
def test_sklearn_scores_equal_the_written_out_formula(form: str) -> None:
    """Prevalence-like truths, probabilities from a confident model, and the clip's edge cases (0, 1, 1e-9,
    exactly PROB_EPS): the score through sklearn.metrics.log_loss equals the hand-written one to 1e-12."""
    rng = np.random.default_rng(7)
    y = (rng.random((500, 8)) < np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2, 0.48])).astype(float)
    p = np.clip(np.where(y > 0, rng.beta(5, 2, y.shape), rng.beta(1, 8, y.shape)), 0.0, 1.0)
    p[:4] = [[0.0] * 8, [1.0] * 8, [1e-9] * 8, [PROB_EPS] * 8]
    assert score_arrays(y, p, form) == pytest.approx(_written_out_score(y, p, form), rel=1e-12)
    uids = [f"1.2.{i}" for i in range(len(y))]
    assert competition_score(*_frames(uids, y.astype(int), p), form) == pytest.approx(_written_out_score(y, p, form),
                                                                                       rel=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_constant_half_is_ln2_and_perfect_is_zero(form: str) -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((25, 8)) < 0.4).astype(int)
    uids = [f"1.2.{i}" for i in range(25)]
    solution, half = _frames(uids, y, np.full(y.shape, 0.5))
    assert score_arrays(y, np.full(y.shape, 0.5), form) == pytest.approx(LN2)
    assert competition_score(solution, half, form) == pytest.approx(LN2)
    assert score_arrays(y, y.astype(float), form) < 1e-6
    _, perfect = _frames(uids, y, y.astype(float))
    assert competition_score(solution, perfect, form) < 1e-6


def test_clipping_keeps_confident_mistakes_finite() -> None:
    y = np.zeros((1, 8), dtype=int)
    y[0, 0] = 1
    p = np.zeros((1, 8))  # C1 predicted exactly 0 although fractured
    # Only C1 contributes: weight 2 × -ln(1e-7), other terms -ln(1 - 1e-7) ≈ 1e-7; Σw = 2 + 6 + 7.
    expected = (2 * -math.log(PROB_EPS) + 13 * -math.log1p(-PROB_EPS)) / 15
    assert score_arrays(y, p, "global") == pytest.approx(expected)


def test_row_order_does_not_matter() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((30, 8)) < 0.3).astype(int)
    p = rng.uniform(0.05, 0.95, size=(30, 8))
    solution, submission = _frames([f"1.2.826.{i}" for i in range(30)], y, p)
    shuffled = submission.sample(frac=1.0, random_state=0).reset_index(drop=True)
    shuffled_solution = solution.sample(frac=1.0, random_state=1).reset_index(drop=True)
    for form in FORMS:
        reference = score_arrays(y, p, form)
        assert competition_score(solution, shuffled, form) == pytest.approx(reference, rel=1e-12)
        assert competition_score(shuffled_solution, submission, form) == pytest.approx(reference, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_frame_and_array_paths_agree(n_studies: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random((n_studies, 8)) < 0.5).astype(int)
    p = rng.random((n_studies, 8))
    solution, submission = _frames([f"9.{i}" for i in range(n_studies)], y, p)
    for form in FORMS:
        assert competition_score(solution, submission, form) == pytest.approx(score_arrays(y, p, form), rel=1e-10)


@pytest.fixture
def tables(two_studies: tuple[np.ndarray, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _frames(["1.2.3", "1.2.4"], *two_studies)


def test_refuses_missing_rows(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    solution, submission = tables
    with pytest.raises(SubmissionError, match=r"lacks row_ids.*1\.2\.4_C3"):
        competition_score(solution, submission[submission.row_id != "1.2.4_C3"])


def test_refuses_extra_rows(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    solution, submission = tables
    extra = pd.concat([submission, pd.DataFrame({"row_id": ["7.7_C1"], "fractured": [0.1]})])
    with pytest.raises(SubmissionError, match=r"absent from the solution.*7\.7_C1"):
        competition_score(solution, extra)


def test_refuses_duplicated_rows(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    solution, submission = tables
    with pytest.raises(SubmissionError, match=r"submission has duplicated row_ids.*1\.2\.3_C2"):
        competition_score(solution, pd.concat([submission, submission.iloc[[1]]]))
    with pytest.raises(SubmissionError, match=r"solution has duplicated row_ids.*1\.2\.3_C1"):
        competition_score(pd.concat([solution, solution.iloc[[0]]]), submission)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1.5, -0.1, "abc"])
def test_refuses_bad_probabilities(tables: tuple[pd.DataFrame, pd.DataFrame], bad: object) -> None:
    solution, submission = tables
    submission = submission.astype({"fractured": object})
    submission.loc[5, "fractured"] = bad
    with pytest.raises(SubmissionError, match=r"finite probabilities.*1\.2\.3_C6"):
        competition_score(solution, submission)
    if not isinstance(bad, str):
        p = np.full((1, 8), 0.5)
        p[0, 7] = bad
        with pytest.raises(SubmissionError, match="finite probabilities"):
            score_arrays(np.zeros((1, 8)), p)


@pytest.mark.parametrize("bad", [0.5, 2, np.nan])
def test_refuses_non_binary_truth(tables: tuple[pd.DataFrame, pd.DataFrame], bad: float) -> None:
    solution, submission = tables
    solution = solution.astype({"fractured": float})
    solution.loc[9, "fractured"] = bad
    with pytest.raises(SubmissionError, match=r"must be 0/1.*1\.2\.4_C2"):
        competition_score(solution, submission)
    y = np.zeros((1, 8))
    y[0, 3] = bad
    with pytest.raises(SubmissionError, match="must be 0/1"):
        score_arrays(y, np.full((1, 8), 0.5))


def test_refuses_malformed_row_ids_and_columns(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    solution, submission = tables
    solution, submission = solution.copy(), submission.copy()
    solution.loc[0, "row_id"] = submission.loc[0, "row_id"] = "1.2.3_C8"
    with pytest.raises(SubmissionError, match=r"1\.2\.3_C8"):
        competition_score(solution, submission)
    with pytest.raises(SubmissionError, match=r"lacks columns \['fractured'\]"):
        competition_score(solution, submission.rename(columns={"fractured": "target"}))
    with pytest.raises(ValueError, match="unknown metric form"):
        competition_score(solution, submission, form="macro")
    with pytest.raises(SubmissionError, match="shape"):
        score_arrays(np.zeros((3, 7)), np.zeros((3, 7)))


def test_competition_weights() -> None:
    y = np.array([[1, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        competition_weights(y), [[2, 1, 1, 1, 1, 1, 2, 14], [1, 1, 1, 1, 1, 1, 1, 7]]
    )
    assert competition_weights(np.zeros(8)).shape == (8,)
    with pytest.raises(ValueError):
        competition_weights(np.zeros((2, 7)))


def test_prior_predictions() -> None:
    np.testing.assert_allclose(prior_predictions(None)[[0, 7]], [146 / 2019, 961 / 2019])
    assert list(prior_predictions(None)) == [REAL_PREVALENCE[c] for c in TARGET_COLUMNS]
    labels = pd.DataFrame(np.array([[1, 0, 0, 0, 0, 0, 0, 1]] + [[0] * 8] * 3), columns=list(TARGET_COLUMNS))
    np.testing.assert_allclose(prior_predictions(labels), [0.25] + [0] * 6 + [0.25])


def test_long_tables_have_kaggle_row_ids() -> None:
    labels = pd.DataFrame([[1, 0, 0, 0, 0, 0, 0, 1]], columns=list(TARGET_COLUMNS)).assign(StudyInstanceUID="1.2.3")
    solution = labels_to_solution(labels)
    assert list(solution.columns) == ["row_id", "fractured"]
    assert solution.row_id.tolist() == [f"1.2.3_{c}" for c in TARGET_COLUMNS]
    assert solution.fractured.tolist() == [1, 0, 0, 0, 0, 0, 0, 1]

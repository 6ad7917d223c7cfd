"""Held-out scoring of a submission (``report.heldout``) and the cross-check's knob moves."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import LayoutError
from rsna_cspine.metric import competition_score, labels_to_solution
from rsna_cspine.report.heldout import pick_examples, pooled_auc_interval, score_heldout, vertebra_table
from tests.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from demo_crosscheck import MOVED_KNOBS, crosscheck_config, moved_knobs  # noqa: E402
from fracture_kinds import by_kind, outranked_share, vertebra_rows  # noqa: E402


def _labels() -> pd.DataFrame:
    rows = [["s1", 1, 1, 0, 0, 0, 0, 0, 1], ["s2", 0, 0, 0, 0, 0, 0, 0, 0], ["s3", 1, 0, 0, 0, 0, 1, 0, 0]]
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "patient_overall", *VERTEBRAE])


def _submission(probs: dict[str, list[float]]) -> pd.DataFrame:
    rows = [(f"{uid}_{col}", p) for uid, values in probs.items() for col, p in zip(TARGET_COLUMNS, values)]
    return pd.DataFrame(rows, columns=["row_id", "fractured"])


PROBS = {  # C1..C7, patient_overall
    "s1": [0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.4, 0.9],
    "s2": [0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.6],
    "s3": [0.1, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.8],
}


def test_scores_count_every_vertebra_against_the_written_out_definitions() -> None:
    labels, submission = _labels(), _submission(PROBS)
    prior = np.array([0.2, 0.1, 0.1, 0.1, 0.2, 0.1, 0.2, 0.6])
    s = score_heldout(submission, labels, prior, threshold=0.5)
    # Fractured: s1 C1 (0.9), s1 C7 (0.4), s3 C5 (0.8) -> 2 of 3 at >= 0.5. Intact: 18, of which s2 C1 (0.6) is >= 0.5.
    assert (s.n_studies, s.n_vertebrae, s.n_fractured) == (3, 21, 3)
    assert s.sensitivity == pytest.approx(2 / 3) and s.specificity == pytest.approx(17 / 18)
    # AUC by counting pairs: 0.9 and 0.8 beat all 18 negatives; 0.4 beats the 17 below it, loses to 0.6.
    assert s.auc == pytest.approx((18 + 18 + 17) / (3 * 18))
    assert s.auc_low <= s.auc <= s.auc_high
    solution = labels_to_solution(labels)
    assert s.score == pytest.approx(competition_score(solution, submission))
    prior_rows = _submission({uid: list(prior) for uid in PROBS})
    assert s.prior_score == pytest.approx(competition_score(solution, prior_rows))
    assert s.below_prior == pytest.approx(1 - s.score / s.prior_score)
    # A threshold above every probability detects nothing and clears every intact vertebra.
    strict = score_heldout(submission, labels, prior, threshold=0.95)
    assert (strict.sensitivity, strict.specificity) == (0.0, 1.0)


def test_the_auc_interval_resamples_whole_studies() -> None:
    rng = np.random.default_rng(3)
    n = 60  # studies; 7 vertebrae each, the fractured ones scored higher on average
    studies = np.repeat([f"s{k}" for k in range(n)], 7)
    y = (rng.random(n * 7) < 0.2).astype(int)
    p = np.clip(0.3 + 0.25 * y + rng.normal(0, 0.2, n * 7), 0, 1)
    low, high = pooled_auc_interval(studies, y, p)
    auc = roc_auc_score(y, p)
    assert low < auc < high and 0.05 < high - low < 0.3
    # The same submission gets the same interval, and the rows' order does not change it.
    order = rng.permutation(n * 7)
    assert (low, high) == pooled_auc_interval(studies, y, p)
    assert pooled_auc_interval(studies[order], y[order], p[order]) == pytest.approx((low, high), abs=0.02)
    # Whole studies are drawn: one study's rows all come or go together, so a single study gives no interval.
    assert np.isnan(pooled_auc_interval(np.repeat(["only"], 7), y[:7], p[:7])).all()
    # Four times the studies: the interval narrows (by about half).
    many = pooled_auc_interval(np.repeat([f"t{k}" for k in range(4 * n)], 7), np.tile(y, 4), np.tile(p, 4))
    assert many[1] - many[0] < 0.7 * (high - low)


def test_scoring_needs_a_row_for_every_labelled_vertebra_and_ignores_other_studies() -> None:
    labels = _labels()
    extra = _submission({**PROBS, "other": [0.5] * 8})
    prior = np.full(8, 0.3)
    assert score_heldout(extra, labels, prior).score == pytest.approx(score_heldout(_submission(PROBS), labels, prior).score)
    with pytest.raises(LayoutError, match="no row for 1 labelled"):
        vertebra_table(extra[extra["row_id"] != "s3_C5"], labels)


def test_examples_are_the_most_confident_hit_and_a_clearly_intact_vertebra_of_its_study() -> None:
    table = vertebra_table(_submission(PROBS), _labels())
    detected, cleared = pick_examples(table, 0.5)
    assert (detected["StudyInstanceUID"], detected["vertebra"], detected["probability"]) == ("s1", "C1", 0.9)
    # Beside it, the detected study's own most clearly intact vertebra (s1: C3-C6 at 0.1, the first of them).
    assert (cleared["StudyInstanceUID"], cleared["vertebra"], cleared["label"]) == ("s1", "C3", 0)
    # Without an intact vertebra below the threshold in that study, the most clearly intact one anywhere.
    elsewhere = table.assign(probability=np.where(table["StudyInstanceUID"] == "s1", 0.95, table["probability"]))
    detected, cleared = pick_examples(elsewhere, 0.5)
    assert detected["StudyInstanceUID"] == "s1" and (cleared["StudyInstanceUID"], cleared["probability"]) == ("s2", 0.05)
    none_hit, _ = pick_examples(table, 0.95)
    assert none_hit is None


def test_crosscheck_moves_each_knob_range_by_one_factor_within_the_spread_and_by_seed() -> None:
    from rsna_cspine.config import load_config
    from rsna_cspine.synth import SynthConfig

    base = load_config(SynthConfig).to_dict()
    moves = {seed: moved_knobs(base, seed, spread=0.25) for seed in (101, 202, 303)}
    assert moves[101] == moved_knobs(base, 101, spread=0.25)  # a seed is one fixed set of knobs
    assert moves[101] != moves[202] != moves[303]
    for move in moves.values():
        assert set(move) == set(MOVED_KNOBS)
        for name, (low, high) in move.items():
            f_low, f_high = low / base[name][0], high / base[name][1]
            assert f_low == pytest.approx(f_high, rel=1e-3) and 1 / 1.25 - 1e-3 <= f_low <= 1.25 + 1e-3
    values = crosscheck_config(base, 202, 12, 0.25)
    cfg = load_config(SynthConfig, values=values)  # valid generator settings
    assert (cfg.seed, cfg.n_studies, cfg.test_fraction, cfg.fov_slab_fraction) == (202, 12, 1.0, 0.0)
    assert tuple(cfg.fracture_size_mm) == tuple(moves[202]["fracture_size_mm"])


def test_fracture_kinds_ranks_each_fractured_vertebra_among_intact_ones_of_its_level_and_set() -> None:
    studies = _labels()
    studies["fracture_kinds"] = [json.dumps({"C1": ["break:posterior_arch"], "C7": ["compression", "break:body"]}),
                                 float("nan"), json.dumps({"C5": ["line:body", "displaced"]})]
    probs = {"s1": [0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4, 0.9], "s2": [0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.6],
             "s3": [0.1, 0.1, 0.1, 0.1, 0.05, 0.1, 0.1, 0.1]}
    fractured = outranked_share(vertebra_rows(_submission(probs), studies, "a")).set_index(["level"])
    # s1 C1 at 0.6: above s3's intact C1 (0.1), tied with s2's (0.6, counts half) -> (1 + 0.5) / 2.
    assert fractured.loc["C1", "outranked"] == pytest.approx(0.75)
    assert fractured.loc["C7", "outranked"] == 1.0 and fractured.loc["C5", "outranked"] == 0.0
    table = by_kind(outranked_share(vertebra_rows(_submission(probs), studies, "a"))).set_index(["group", "level"])
    assert table.loc[("with compression", "all"), ["n", "outranked"]].tolist() == [1, 1.0]
    assert table.loc[("without compression", "all"), "outranked"] == pytest.approx((0.75 + 0.0) / 2)
    assert table.loc[("kind displaced", "all"), "outranked"] == 0.0
    # Ranks are taken within a set: another set's intact vertebrae do not count, and a study the submission
    # does not score is left out (without s2, s1's C1 only has s3's below it).
    other = vertebra_rows(_submission({uid: [0.99] * 8 for uid in probs}), studies, "b")
    both = outranked_share(pd.concat([vertebra_rows(_submission(probs), studies, "a"), other], ignore_index=True))
    assert both[both["set"] == "a"]["outranked"].tolist() == fractured["outranked"].tolist()
    without_s2 = outranked_share(vertebra_rows(_submission({k: v for k, v in probs.items() if k != "s2"}), studies, "a"))
    assert without_s2.set_index("level").loc["C1", "outranked"] == 1.0

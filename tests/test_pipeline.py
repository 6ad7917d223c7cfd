"""End-to-end prediction: broken studies, row order, shards and merge, time budget, resume.

The models are real but tiny and untrained (a MONAI UNet and timm's ``test_resnet`` built through the
project's factories and saved with ``engine.save_checkpoint``); the studies are real DICOM series
written with pydicom (``tests/toy_pipeline.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.aggregate import PATIENT_RULES
from rsna_cspine.calibration import PatientCalibration
from rsna_cspine.constants import PROB_EPS, TARGET_COLUMNS
from rsna_cspine.errors import ConfigError, LayoutError, SubmissionError
from rsna_cspine.inference import (
    STAGES,
    FracturePipeline,
    PipelineConfig,
    PredictionBudget,
    merge_shards,
    parts_dir,
    predict_dataset,
    read_shard,
    timing_log_path,
)
from rsna_cspine.runner import parse_shard, shard_studies
from tests.toy_pipeline import EXPECTED_PRIOR, GARBAGE, GOOD, MISSING, make_tiny_dataset, make_tiny_models

torch.set_num_threads(1)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"row_id": str})


def _by_study(submission: pd.DataFrame) -> dict[str, np.ndarray]:
    """row_id, fractured → {uid: (8,) in TARGET_COLUMNS order}."""
    parts = submission["row_id"].str.extract(r"^(?P<uid>.+)_(?P<target>C[1-7]|patient_overall)$")
    table = submission.assign(**parts).pivot(index="uid", columns="target", values="fractured")
    return {uid: table.loc[uid, list(TARGET_COLUMNS)].to_numpy(np.float64) for uid in table.index}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("models"), n_folds=2)


@pytest.fixture(scope="module")
def full_run(models: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "submission.csv"
    predict_dataset(tiny_dataset, models, out, cfg=PipelineConfig(device="cpu"), progress=False)
    return out


CPU = PipelineConfig(device="cpu")


def test_broken_studies_get_the_prior_and_the_file_is_complete(full_run: Path, tiny_dataset: Path) -> None:
    submission = _read(full_run)
    test = pd.read_csv(tiny_dataset / "test.csv", dtype=str)
    # Exactly test.csv's rows, in its (shuffled) order, every value a clipped probability.
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    values = submission["fractured"].to_numpy()
    assert np.isfinite(values).all() and (values >= PROB_EPS).all() and (values <= 1 - PROB_EPS).all()
    per_study = _by_study(submission)
    for uid in (GARBAGE, MISSING):
        np.testing.assert_allclose(per_study[uid], EXPECTED_PRIOR, rtol=1e-12)
    # The good studies went through the networks: their numbers are not the prior.
    for uid in GOOD:
        assert not np.allclose(per_study[uid], EXPECTED_PRIOR)
    timings = pd.read_csv(timing_log_path(full_run), dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    assert timings.loc[GOOD, "status"].eq("ok").all()
    assert (timings.loc[GOOD, ["load_s", "segment_s", "crop_s", "classify_s", "total_s"]] > 0).all().all()
    assert timings.loc[GOOD, "n_slices"].eq(16).all()
    assert timings.loc[GARBAGE, "status"] == "failed" and timings.loc[MISSING, "status"] == "failed"
    assert timings.loc[MISSING, "reason"].startswith("load failed") and "does not exist" in timings.loc[MISSING, "reason"]
    assert "load failed" in timings.loc[GARBAGE, "reason"]


def test_failure_is_logged_with_study_and_cause(models: Path, tiny_dataset: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rsna_cspine.runner"):
        predict_dataset(tiny_dataset, models, tmp_path / "s.csv", cfg=CPU, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(MISSING in m and "does not exist" in m for m in messages)
    assert any(GARBAGE in m and "load failed" in m for m in messages)


def test_good_studies_do_not_depend_on_the_broken_ones(
    full_run: Path, tiny_dataset: Path, models: Path, tmp_path: Path
) -> None:
    clean = make_tiny_dataset(tmp_path / "clean", uids=[], broken=False)
    shutil.rmtree(clean / "test_images", ignore_errors=True)
    (clean / "test_images").symlink_to(tiny_dataset / "test_images")
    test = pd.read_csv(tiny_dataset / "test.csv", dtype=str)
    test[test["StudyInstanceUID"].isin(GOOD)].to_csv(clean / "test.csv", index=False)
    out = tmp_path / "clean.csv"
    predict_dataset(clean, models, out, cfg=CPU, progress=False)
    with_broken, without = _by_study(_read(full_run)), _by_study(_read(out))
    assert sorted(without) == sorted(GOOD)
    for uid in GOOD:
        np.testing.assert_array_equal(with_broken[uid], without[uid])


def test_patient_overall_follows_the_rule_and_absent_vertebrae_take_the_prior(models: Path) -> None:
    prior = np.array([0.1, 0.2, 0.05, 0.06, 0.07, 0.15, 0.2, 0.5])
    raw = np.array([0.3, np.nan, 0.01, 0.9, np.nan, 0.2, 0.4])
    filled = np.array([0.3, 0.2, 0.01, 0.9, 0.07, 0.2, 0.4])
    noisy_or = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu"), prior).aggregate(raw)
    np.testing.assert_allclose(noisy_or[:7], filled)
    np.testing.assert_allclose(noisy_or[7], 1 - np.prod(1 - filled))
    max_rule = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu", rule="max"), prior).aggregate(raw)
    assert max_rule[7] == pytest.approx(0.9)
    blend = PipelineConfig(device="cpu", rule="blend", blend_weight=0.25)
    blended = FracturePipeline.from_models_dir(models, blend, prior).aggregate(raw)
    assert blended[7] == pytest.approx(0.25 * (1 - np.prod(1 - filled)) + 0.75 * 0.9)
    certain = FracturePipeline.from_models_dir(models, CPU, prior).aggregate(np.array([1.0, 0, 0, 0, 0, 0, 0]))
    assert certain.max() == 1 - PROB_EPS and certain.min() == PROB_EPS


def test_default_rule_uses_the_checkpoints_calibrations_or_falls_back_to_noisy_or(
    models: Path, tmp_path: Path, caplog
) -> None:
    prior = np.array([0.1, 0.2, 0.05, 0.06, 0.07, 0.15, 0.2, 0.5])
    raw = np.array([0.3, 0.1, 0.01, 0.2, 0.05, 0.2, 0.4])
    noisy_or = 1 - np.prod(1 - raw)
    fits = [PatientCalibration(0.5, -1.0, 40, 20), PatientCalibration(2.0, 0.3, 40, 25)]
    calibrated = make_tiny_models(tmp_path / "calibrated", n_folds=2, calibrations=fits)
    pipeline = FracturePipeline.from_models_dir(calibrated, PipelineConfig(device="cpu"), prior)
    assert pipeline.calibrations == fits
    overall = pipeline.aggregate(raw)[7]
    assert overall == pytest.approx((fits[0].apply(noisy_or) + fits[1].apply(noisy_or)) / 2, rel=1e-9)
    assert abs(overall - noisy_or) > 0.05
    # Checkpoints without a calibration: plain noisy-OR, and the log says so.
    with caplog.at_level(logging.WARNING, logger="rsna_cspine.inference.predictor"):
        plain = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu"), prior)
    assert plain.aggregate(raw)[7] == pytest.approx(noisy_or, rel=1e-12)
    assert "no stage-2 checkpoint carries a patient_overall calibration" in caplog.text


def test_fold_ensemble_averages_and_cheap_path_uses_the_first_fold(
    models: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    folder = tiny_dataset / "test_images" / GOOD[0]
    both = FracturePipeline.from_models_dir(models, CPU)
    assert len(both.classifier_checkpoints) == 2
    single = {}
    for fold in (0, 1):
        one = tmp_path / f"fold{fold}"
        shutil.copytree(models / "seg", one / "seg")
        (one / "cls").mkdir(parents=True)
        shutil.copy(models / "cls" / f"fold{fold}" / "best.pt", one / "cls" / "best.pt")
        single[fold] = FracturePipeline.from_models_dir(one, CPU).predict_study(folder).vertebra_probs
    full = both.predict_study(folder)
    np.testing.assert_allclose(full.vertebra_probs, (single[0] + single[1]) / 2, rtol=1e-6)
    cheap = both.predict_study(folder, path="cheap")
    assert cheap.path == "cheap"
    np.testing.assert_allclose(cheap.vertebra_probs, single[0], rtol=1e-6)


def test_public_steps_compose_to_predict_study_and_intermediates_are_kept_on_request(
    models: Path, tiny_dataset: Path
) -> None:
    pipeline = FracturePipeline.from_models_dir(models, CPU)
    folder = tiny_dataset / "test_images" / GOOD[0]
    stages: list[str] = []
    kept = pipeline.predict_study(folder, keep_intermediates=True, on_stage=stages.append)
    assert stages == list(STAGES)
    volume = pipeline.load(folder)
    segmentation = pipeline.segment(volume)
    crops = pipeline.crop(volume, segmentation)
    raw = pipeline.classify(crops)
    np.testing.assert_array_equal(raw, kept.vertebra_probs)
    np.testing.assert_array_equal(pipeline.aggregate(raw), kept.probs)
    parts = kept.intermediates
    np.testing.assert_array_equal(parts.volume.hu, volume.hu)
    np.testing.assert_array_equal(parts.segmentation.mask, segmentation.mask)
    pd.testing.assert_frame_equal(parts.segmentation.vertebrae, segmentation.vertebrae)
    np.testing.assert_array_equal(parts.crops.images, crops.images)
    assert pipeline.predict_study(folder).intermediates is None  # by default the big arrays are let go


def test_shards_merge_into_the_unsharded_submission(
    full_run: Path, tiny_dataset: Path, models: Path, tmp_path: Path
) -> None:
    test = pd.read_csv(tiny_dataset / "test.csv", dtype=str)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    files = []
    for index in range(3):
        shard_uids = shard_studies(uids, (index, 3))
        assert shard_uids == uids[index::3]
        out = tmp_path / f"shard{index}.csv"
        rows = predict_dataset(tiny_dataset, models, out, shard=(index, 3), cfg=CPU, progress=False)
        header, stored = read_shard(out)
        assert header["studies"] == shard_uids and (header["shard"], header["n_shards"]) == (index, 3)
        assert set(stored["row_id"]) == set(test.loc[test["StudyInstanceUID"].isin(shard_uids), "row_id"])
        assert len(rows) == 8 * len(shard_uids)
        files.append(out)
    merged = merge_shards(files[::-1], tiny_dataset / "test.csv", tmp_path / "merged.csv")
    pd.testing.assert_frame_equal(merged, _read(full_run))
    pd.testing.assert_frame_equal(_read(tmp_path / "merged.csv"), _read(full_run))


@pytest.fixture(scope="module")
def prior_shards(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shard files made without models (budget 0 → prior): enough to exercise merge's checks."""
    folder = tmp_path_factory.mktemp("shards")
    cfg = PipelineConfig(device="cpu", time_budget_s=0)
    for index in range(3):
        predict_dataset(tiny_dataset, folder / "no-models", folder / f"s{index}.csv", shard=(index, 3), cfg=cfg,
                        progress=False)
    return [folder / f"s{index}.csv" for index in range(3)]


def test_merge_refuses_missing_duplicated_and_foreign_shards(
    prior_shards: list[Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    test_csv = tiny_dataset / "test.csv"
    out = tmp_path / "m.csv"
    with pytest.raises(SubmissionError, match=r"missing shard\(s\) \[1\]"):
        merge_shards([prior_shards[0], prior_shards[2]], test_csv, out)
    with pytest.raises(SubmissionError, match="given twice"):
        merge_shards([prior_shards[0], prior_shards[1], prior_shards[2], prior_shards[1]], test_csv, out)
    # A study listed by two shards (the file edited by hand).
    lines = prior_shards[1].read_text().splitlines(keepends=True)
    header = json.loads(lines[0][2:])
    other = json.loads(prior_shards[0].read_text().splitlines()[0][2:])["studies"][0]
    header["studies"].append(other)
    tampered = tmp_path / "s1.csv"
    tampered.write_text("# " + json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(SubmissionError, match=f"study {other} is in shard 0 and shard 1"):
        merge_shards([prior_shards[0], tampered, prior_shards[2]], test_csv, out)
    # A shard missing rows of its studies.
    short = tmp_path / "short.csv"
    short.write_text("".join(prior_shards[2].read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SubmissionError, match="1 missing"):
        merge_shards([prior_shards[0], prior_shards[1], short], test_csv, out)
    # Shards of another split of the studies, or cut from another test.csv.
    with pytest.raises(SubmissionError, match="not a shard file"):
        merge_shards([test_csv], test_csv, out)
    other_test = tmp_path / "test.csv"
    pd.read_csv(test_csv, dtype=str).iloc[:-8].to_csv(other_test, index=False)
    with pytest.raises(SubmissionError, match="another test.csv"):
        merge_shards(prior_shards, other_test, out)
    assert not out.exists()
    merged = merge_shards(prior_shards, test_csv, out)
    assert merged["row_id"].tolist() == pd.read_csv(test_csv, dtype=str)["row_id"].tolist()


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_time_budget_zero_gives_the_prior_for_every_study(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "prior.csv"
    # No models are even loaded: the folder need not exist.
    predict_dataset(tiny_dataset, tmp_path / "absent", out, cfg=PipelineConfig(time_budget_s=0), progress=False)
    per_study = _by_study(_read(out))
    test = pd.read_csv(tiny_dataset / "test.csv", dtype=str)
    assert _read(out)["row_id"].tolist() == test["row_id"].tolist()
    for probs in per_study.values():
        np.testing.assert_allclose(probs, EXPECTED_PRIOR, rtol=1e-12)
    timings = pd.read_csv(timing_log_path(out))
    assert timings["path"].eq("prior").all() and timings["status"].eq("budget").all()


def test_missing_models_still_write_a_complete_prior_submission(tiny_dataset: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.ERROR, logger="rsna_cspine.inference.dataset"):
        predict_dataset(tiny_dataset, tmp_path / "absent", out, cfg=CPU, progress=False)
    assert any("could not load the models" in r.getMessage() for r in caplog.records)
    assert len(_read(out)) == len(pd.read_csv(tiny_dataset / "test.csv"))
    assert pd.read_csv(timing_log_path(out))["reason"].str.startswith("models").all()


def test_time_budget_switches_to_cheap_then_prior() -> None:
    def budget(limit: float, elapsed: float, full: list[float], cheap: list[float]) -> PredictionBudget:
        clock = PredictionBudget(limit, safety=1.0, start=time.monotonic() - elapsed)
        for t in full:
            clock.record("full", t)
        for t in cheap:
            clock.record("cheap", t)
        return clock

    assert PredictionBudget(None).choose(10**6) == "full"
    assert budget(100, 0, [], []).choose(50) == "full"  # nothing measured: run one to learn the cost
    assert budget(100, 0, [9, 10, 30], []).choose(9) == "full"  # median 10 s × 9 studies fits in ~100 s
    assert budget(100, 0, [9, 10, 30], []).choose(11) == "cheap"  # it does not: try the cheap path
    assert budget(100, 0, [10], [1]).choose(50) == "cheap"  # 50 × 1 s fits
    assert budget(100, 0, [10], [5]).choose(50) == "cheap"  # only some fit: cheap while one more fits
    assert budget(100, 97, [10], [5]).choose(50) == "prior"  # 3 s left < 5 s
    assert budget(100, 101, [], []).choose(1) == "prior"
    assert PredictionBudget(0).choose(1) == "prior"


def test_rerun_resumes_from_parts_and_recomputes_after_a_settings_change(
    full_run: Path, models: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "submission.csv"
    shutil.copytree(parts_dir(full_run), parts_dir(out))
    # Drop one finished study: only that one is predicted again.
    (parts_dir(out) / f"{GOOD[1]}.json").unlink()
    predict_dataset(tiny_dataset, models, out, cfg=CPU, progress=False)
    timings = pd.read_csv(timing_log_path(out), dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    assert timings.loc[[u for u in GOOD if u != GOOD[1]], "resumed"].all()
    assert not timings.loc[GOOD[1], "resumed"]
    assert not timings.loc[[GARBAGE, MISSING], "resumed"].any()  # failures are retried
    pd.testing.assert_frame_equal(_read(out), _read(full_run))
    # Another rule: earlier parts do not match the settings, every study is recomputed.
    predict_dataset(tiny_dataset, models, out, cfg=PipelineConfig(device="cpu", rule="max"), progress=False)
    timings = pd.read_csv(timing_log_path(out))
    assert not timings["resumed"].any()
    for uid, probs in _by_study(_read(out)).items():
        if uid in GOOD:
            assert probs[7] == pytest.approx(probs[:7].max())


def test_config_validation_and_checkpoint_layout(tmp_path: Path) -> None:
    for bad in (dict(rule="mean"), dict(time_budget_s=-1.0), dict(cheap_folds=0), dict(prior="x"), dict(blend_weight=2.0)):
        with pytest.raises(ConfigError):
            PipelineConfig(**bad).validate()
    assert set(PATIENT_RULES) >= {"noisy_or", "max", "blend"}
    with pytest.raises(LayoutError, match="no 'seg' folder"):
        FracturePipeline.from_models_dir(tmp_path, CPU)


def test_cpu_bf16_setting_reaches_both_paths_and_keeps_the_probabilities(models: Path, tiny_dataset: Path) -> None:
    from rsna_cspine.cls.predict import cpu_has_native_bf16

    folder = tiny_dataset / "test_images" / GOOD[0]
    fp32 = FracturePipeline.from_models_dir(models, CPU)
    bf16 = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu", cpu_bf16=True, cheap_folds=1))
    # Honoured only where the CPU computes bf16 natively; elsewhere the pipeline stays in fp32.
    assert bf16.classifiers("full").cpu_bf16 == bf16.classifiers("cheap").cpu_bf16 == cpu_has_native_bf16()
    assert not fp32.classifiers("full").cpu_bf16
    assert bf16.fingerprint()["settings"]["cpu_bf16"] and not fp32.fingerprint()["settings"]["cpu_bf16"]
    np.testing.assert_allclose(bf16.predict_study(folder).vertebra_probs, fp32.predict_study(folder).vertebra_probs,
                               atol=2e-2)

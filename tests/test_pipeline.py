"""End-to-end prediction: broken studies, row order, shards and merge, time budget, resume.

The models are real but tiny and untrained (a MONAI UNet and timm's ``test_resnet`` built through the
project's factories and saved with ``engine.save_checkpoint``); the studies are real DICOM series
written with pydicom. The helpers ``make_tiny_models`` and ``make_tiny_dataset`` are reused by the
CLI, notebook and bundle tests.
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

from dicom_factory import axial_positions, write_series
from rsna_cspine.aggregate import PATIENT_RULES, PatientCalibration
from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.model import build_classifier
from rsna_cspine.config import to_dict
from rsna_cspine.constants import PROB_EPS, TARGET_COLUMNS
from rsna_cspine.engine import save_checkpoint, seed_everything
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
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.model import build_model
from rsna_cspine.seg.preprocess import num_classes

torch.set_num_threads(1)

GOOD = [f"1.2.826.0.1.3680043.8.{k}" for k in range(1, 6)]
GARBAGE = "1.2.826.0.1.3680043.8.90"  # a folder of files that are not DICOM
MISSING = "1.2.826.0.1.3680043.8.91"  # in test.csv, no folder at all
TRAIN_LABELS = pd.DataFrame(
    {
        "StudyInstanceUID": ["t1", "t2", "t3", "t4"],
        "patient_overall": [1, 1, 0, 0],
        "C1": [1, 0, 0, 0],
        "C2": [1, 1, 0, 0],
        "C3": [0, 0, 0, 0],
        "C4": [0, 1, 0, 0],
        "C5": [0, 0, 0, 0],
        "C6": [0, 1, 0, 0],
        "C7": [1, 1, 0, 0],
    }
)
#: The prior a dataset with TRAIN_LABELS gets: each column's mean, clipped as in every submission.
EXPECTED_PRIOR = np.clip(TRAIN_LABELS[list(TARGET_COLUMNS)].mean().to_numpy(), PROB_EPS, 1 - PROB_EPS)


def make_tiny_models(
    root: Path, n_folds: int = 1, seed: int = 0, calibrations: list[PatientCalibration] | None = None
) -> Path:
    """A models folder (``seg/fold0/best.pt``, ``cls/fold{k}/best.pt``) of tiny untrained real networks.

    ``calibrations`` (one per fold) go into the checkpoints as training stores them; default none.
    """
    seed_everything(seed)
    seg = SegConfig()
    seg.data.grid = (16, 32, 32)
    seg.model.channels, seg.model.strides, seg.model.num_res_units = (4, 8, 16), (2, 2), 1
    unet = build_model(seg.model, num_classes(seg.data.thoracic))
    save_checkpoint(root / "seg" / "fold0" / "best.pt", model=unet, epoch=1, config=to_dict(seg))
    for fold in range(n_folds):
        cls = ClsConfig(fold=fold)
        cls.model.backbone, cls.model.hidden = "test_resnet", 8
        cls.data.crop.n_slices, cls.data.crop.channels, cls.data.crop.size = 4, 3, 32
        extra = {"patient_calibration": calibrations[fold].to_dict()} if calibrations else None
        save_checkpoint(root / "cls" / f"fold{fold}" / "best.pt", model=build_classifier(cls), epoch=1, config=to_dict(cls),
                        extra=extra)
    return root


def make_tiny_dataset(root: Path, uids: list[str] = GOOD, broken: bool = True, seed: int = 0) -> Path:
    """A Kaggle-layout folder: train.csv (TRAIN_LABELS), test.csv with rows in a shuffled order, test_images/.

    With ``broken``, test.csv also lists GARBAGE (non-DICOM files) and MISSING (no folder).
    """
    root.mkdir(parents=True, exist_ok=True)
    TRAIN_LABELS.to_csv(root / "train.csv", index=False)
    for k, uid in enumerate(uids):
        _write_series(root / "test_images", uid, seed + k)
    listed = list(uids)
    if broken:
        garbage = root / "test_images" / GARBAGE
        garbage.mkdir(parents=True)
        for n in range(1, 4):
            (garbage / f"{n}.dcm").write_bytes(b"this is not a DICOM file" * 10)
        listed = listed[:2] + [GARBAGE] + listed[2:] + [MISSING]
    rows = [(f"{uid}_{target}", uid, target) for uid in listed for target in TARGET_COLUMNS]
    # Kaggle's test.csv is not grouped by target order: shuffle the targets within each study.
    order = np.random.default_rng(seed).permutation(len(TARGET_COLUMNS))
    rows = [rows[i * len(TARGET_COLUMNS) + j] for i in range(len(listed)) for j in order]
    pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]).to_csv(root / "test.csv", index=False)
    return root


def _write_series(images: Path, uid: str, seed: int, n_slices: int = 16, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    spine = (yy - size * 0.6) ** 2 + (xx - size / 2) ** 2 < (size * 0.12) ** 2
    hu = np.where(body, 40.0, -1000.0) + np.where(spine, 700.0, 0.0)
    values = hu[None] + rng.normal(0.0, 30.0, size=(n_slices, size, size))
    write_series(images / uid, np.rint(values).astype(np.int16), axial_positions(n_slices), study_uid=uid, intercepts=[0.0] * n_slices)


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
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(models: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "submission.csv"
    predict_dataset(data, models, out, cfg=PipelineConfig(device="cpu"), progress=False)
    return out


CPU = PipelineConfig(device="cpu")


def test_broken_studies_get_the_prior_and_the_file_is_complete(full_run: Path, data: Path) -> None:
    submission = _read(full_run)
    test = pd.read_csv(data / "test.csv", dtype=str)
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


def test_failure_is_logged_with_study_and_cause(models: Path, data: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rsna_cspine.runner"):
        predict_dataset(data, models, tmp_path / "s.csv", cfg=CPU, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(MISSING in m and "does not exist" in m for m in messages)
    assert any(GARBAGE in m and "load failed" in m for m in messages)


def test_good_studies_do_not_depend_on_the_broken_ones(full_run: Path, data: Path, models: Path, tmp_path: Path) -> None:
    clean = make_tiny_dataset(tmp_path / "clean", uids=[], broken=False)
    shutil.rmtree(clean / "test_images", ignore_errors=True)
    (clean / "test_images").symlink_to(data / "test_images")
    test = pd.read_csv(data / "test.csv", dtype=str)
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


def test_fold_ensemble_averages_and_cheap_path_uses_the_first_fold(models: Path, data: Path, tmp_path: Path) -> None:
    folder = data / "test_images" / GOOD[0]
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


def test_public_steps_compose_to_predict_study_and_intermediates_are_kept_on_request(models: Path, data: Path) -> None:
    pipeline = FracturePipeline.from_models_dir(models, CPU)
    folder = data / "test_images" / GOOD[0]
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


def test_shards_merge_into_the_unsharded_submission(full_run: Path, data: Path, models: Path, tmp_path: Path) -> None:
    test = pd.read_csv(data / "test.csv", dtype=str)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    files = []
    for index in range(3):
        shard_uids = shard_studies(uids, (index, 3))
        assert shard_uids == uids[index::3]
        out = tmp_path / f"shard{index}.csv"
        rows = predict_dataset(data, models, out, shard=(index, 3), cfg=CPU, progress=False)
        header, stored = read_shard(out)
        assert header["studies"] == shard_uids and (header["shard"], header["n_shards"]) == (index, 3)
        assert set(stored["row_id"]) == set(test.loc[test["StudyInstanceUID"].isin(shard_uids), "row_id"])
        assert len(rows) == 8 * len(shard_uids)
        files.append(out)
    merged = merge_shards(files[::-1], data / "test.csv", tmp_path / "merged.csv")
    pd.testing.assert_frame_equal(merged, _read(full_run))
    pd.testing.assert_frame_equal(_read(tmp_path / "merged.csv"), _read(full_run))


@pytest.fixture(scope="module")
def prior_shards(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shard files made without models (budget 0 → prior): enough to exercise merge's checks."""
    folder = tmp_path_factory.mktemp("shards")
    cfg = PipelineConfig(device="cpu", time_budget_s=0)
    for index in range(3):
        predict_dataset(data, folder / "no-models", folder / f"s{index}.csv", shard=(index, 3), cfg=cfg, progress=False)
    return [folder / f"s{index}.csv" for index in range(3)]


def test_merge_refuses_missing_duplicated_and_foreign_shards(prior_shards: list[Path], data: Path, tmp_path: Path) -> None:
    test_csv = data / "test.csv"
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


def test_time_budget_zero_gives_the_prior_for_every_study(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "prior.csv"
    # No models are even loaded: the folder need not exist.
    predict_dataset(data, tmp_path / "absent", out, cfg=PipelineConfig(time_budget_s=0), progress=False)
    per_study = _by_study(_read(out))
    test = pd.read_csv(data / "test.csv", dtype=str)
    assert _read(out)["row_id"].tolist() == test["row_id"].tolist()
    for probs in per_study.values():
        np.testing.assert_allclose(probs, EXPECTED_PRIOR, rtol=1e-12)
    timings = pd.read_csv(timing_log_path(out))
    assert timings["path"].eq("prior").all() and timings["status"].eq("budget").all()


def test_missing_models_still_write_a_complete_prior_submission(data: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.ERROR, logger="rsna_cspine.inference.dataset"):
        predict_dataset(data, tmp_path / "absent", out, cfg=CPU, progress=False)
    assert any("could not load the models" in r.getMessage() for r in caplog.records)
    assert len(_read(out)) == len(pd.read_csv(data / "test.csv"))
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


def test_rerun_resumes_from_parts_and_recomputes_after_a_settings_change(full_run: Path, models: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    shutil.copytree(parts_dir(full_run), parts_dir(out))
    # Drop one finished study: only that one is predicted again.
    (parts_dir(out) / f"{GOOD[1]}.json").unlink()
    predict_dataset(data, models, out, cfg=CPU, progress=False)
    timings = pd.read_csv(timing_log_path(out), dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    assert timings.loc[[u for u in GOOD if u != GOOD[1]], "resumed"].all()
    assert not timings.loc[GOOD[1], "resumed"]
    assert not timings.loc[[GARBAGE, MISSING], "resumed"].any()  # failures are retried
    pd.testing.assert_frame_equal(_read(out), _read(full_run))
    # Another rule: earlier parts do not match the settings, every study is recomputed.
    predict_dataset(data, models, out, cfg=PipelineConfig(device="cpu", rule="max"), progress=False)
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


def test_cpu_bf16_setting_reaches_both_paths_and_keeps_the_probabilities(models: Path, data: Path) -> None:
    from rsna_cspine.cls.predict import cpu_has_native_bf16

    folder = data / "test_images" / GOOD[0]
    fp32 = FracturePipeline.from_models_dir(models, CPU)
    bf16 = FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu", cpu_bf16=True, cheap_folds=1))
    # Honoured only where the CPU computes bf16 natively; elsewhere the pipeline stays in fp32.
    assert bf16.classifiers("full").cpu_bf16 == bf16.classifiers("cheap").cpu_bf16 == cpu_has_native_bf16()
    assert not fp32.classifiers("full").cpu_bf16
    assert bf16.fingerprint()["settings"]["cpu_bf16"] and not fp32.fingerprint()["settings"]["cpu_bf16"]
    np.testing.assert_allclose(bf16.predict_study(folder).vertebra_probs, fp32.predict_study(folder).vertebra_probs,
                               atol=2e-2)

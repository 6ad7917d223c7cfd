"""``rsna-cspine prepare``: one decode per study, every product from it, shards, resume, failures, and the
trainers reading the cache without touching DICOM."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.cli import main
from rsna_cspine.crops import CropConfig, build_crop_cache, load_crops
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.io.dicom import load_series
from rsna_cspine.io.kaggle import KaggleLayout
from rsna_cspine.io.nifti import load_segmentation
from rsna_cspine.prepare import (
    MANIFEST_COLUMNS,
    PrepareConfig,
    PreparedCache,
    Stage1InputConfig,
    merge_caches,
    prepare_dataset,
)
from rsna_cspine.runner import split_cpus
from rsna_cspine.seg.preprocess import fold_labels, preprocess_volume, resample_nearest

torch.set_num_threads(1)

GRID = (16, 32, 32)
CROP = CropConfig(n_slices=4, channels=3, size=24)
#: The same settings as key=value overrides of ``rsna-cspine prepare``.
SETTINGS = ["stage1.grid=[16,32,32]", "crop.n_slices=4", "crop.channels=3", "crop.size=24"]
#: Columns that differ from run to run (wall times) or by who ran the study.
VARYING = [c for c in MANIFEST_COLUMNS if c.startswith("seconds_")] + ["decode_workers"]


def _cfg(**values) -> PrepareConfig:
    return PrepareConfig(**{"stage1": Stage1InputConfig(grid=GRID), "crop": CROP, "workers": 1, **values})


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """Five train studies (most segmented, some with boxes; compressed and plain storage) and a test study."""
    from rsna_cspine.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("kaggle")
    write_dataset(root, SynthConfig(n_studies=6, seed=11, image_size=48, n_slices=(30, 36), test_fraction=0.2,
                                    segmentation_fraction=0.7, bbox_fraction=1.0, prevalence_scale=2.5), progress=False)
    return root


def _train_uids(root: Path) -> list[str]:
    return pd.read_csv(root / "train.csv", dtype=str)["StudyInstanceUID"].tolist()


def _copy(layout: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layout, tmp_path / "kaggle"))


def _snapshot(cache: Path) -> dict[str, object]:
    """Every array of every file the cache holds, and its manifest without the wall times."""
    arrays = {}
    for path in sorted(cache.glob("*/*.npz")):
        with np.load(path) as npz:
            arrays[path.relative_to(cache).as_posix()] = {k: npz[k] for k in npz.files}
    manifest = pd.read_csv(cache / "manifest.csv", dtype={"StudyInstanceUID": str}).drop(columns=VARYING)
    return {"arrays": arrays, "manifest": manifest}


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    pd.testing.assert_frame_equal(a["manifest"], b["manifest"])
    assert sorted(a["arrays"]) == sorted(b["arrays"])
    for name, arrays in a["arrays"].items():
        assert sorted(arrays) == sorted(b["arrays"][name]), name
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, b["arrays"][name][key], err_msg=f"{name}:{key}")


def _count_decodes(monkeypatch, single_threaded: list[bool] | None = None) -> dict[str, int]:
    """Study folder name → how many times its slices were decoded (the loader's pixel pass); appends to
    ``single_threaded`` whether each decode used the single-threaded decoders."""
    import rsna_cspine.io.dicom.decode as decode
    import rsna_cspine.io.dicom.series as series

    counts: dict[str, int] = {}
    original = series.decode_series

    def counting(slices, pool, report):
        counts[report.folder.name] = counts.get(report.folder.name, 0) + 1
        if single_threaded is not None:
            single_threaded.append(decode._SINGLE_THREADED)
        return original(slices, pool, report)

    monkeypatch.setattr(series, "decode_series", counting)
    return counts


def test_one_decode_per_study_writes_every_product_of_the_old_caches(layout, tmp_path, monkeypatch) -> None:
    single_threaded: list[bool] = []
    decodes = _count_decodes(monkeypatch, single_threaded)
    summary = prepare_dataset(layout, tmp_path / "cache", _cfg(cpus=1), progress=False)
    uids = _train_uids(layout)
    assert decodes == {uid: 1 for uid in uids}  # each series decoded once, whatever it was turned into
    assert single_threaded == [True] * len(uids)  # a one-core study never decodes on more threads (GDCM's JPEG 2000)
    assert (summary.done, summary.resumed, summary.failed, summary.workers) == (5, 0, {}, 1)
    cache = PreparedCache(tmp_path / "cache")
    manifest = pd.read_csv(cache.root / "manifest.csv", dtype={"StudyInstanceUID": str})
    assert manifest.columns.tolist() == list(MANIFEST_COLUMNS)
    assert sorted(manifest["StudyInstanceUID"]) == sorted(uids) and (manifest["status"] == "done").all()
    assert summary.bytes_written == manifest["bytes"].sum() > 0

    # What the stage-1 cache and the crop cache wrote before, from their own decode, is what prepare wrote.
    kaggle = KaggleLayout(layout)
    segmented = [u for u in uids if kaggle.segmentation_path(u)]
    old_crops = build_crop_cache(kaggle, segmented, "gt", tmp_path / "old_crops", CROP)
    assert (old_crops["status"] == "built").all()
    for uid in uids:
        row = manifest.set_index("StudyInstanceUID").loc[uid]
        volume = load_series(kaggle.study_dir(uid, "train"))
        assert (row["n_slices"], row["rows"], row["cols"]) == volume.shape
        with np.load(cache.seg_path(uid)) as npz:
            image = preprocess_volume(volume, GRID)
            np.testing.assert_array_equal(npz["image"], image.astype(np.float16))
            assert ("labels" in npz) == (uid in segmented) == bool(row["has_labels"])
            if uid not in segmented:
                assert row["reason"].startswith("no crops") and pd.isna(row["crop_file"])
                assert not cache.crop_path(uid).exists() and not cache.mask_path(uid).exists()
                continue
            labels = load_segmentation(kaggle.segmentation_path(uid), volume)
            np.testing.assert_array_equal(npz["labels"], resample_nearest(labels, GRID))
        with np.load(cache.mask_path(uid)) as npz:
            np.testing.assert_array_equal(npz["mask"], fold_labels(labels))
            np.testing.assert_array_equal(npz["slice_numbers"], volume.slice_numbers)
        got, old = load_crops(cache.crop_path(uid)), load_crops(tmp_path / "old_crops" / f"{uid}.npz")
        for name in ("images", "present", "slice_index", "slice_labels", "box_maps"):
            np.testing.assert_array_equal(getattr(got, name), getattr(old, name), err_msg=name)
        assert row["mask_source"] == "gt" and row["n_present"] == got.present.sum()
        record = json.loads((cache.ledger_dir / f"{uid}.json").read_text())
        assert record["outputs"] == [f"seg/{uid}.npz", f"masks/{uid}_mask.npz", f"crops/{uid}.npz"]  # relative
    boxed = set(pd.read_csv(layout / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})["StudyInstanceUID"])
    assert boxed and set(manifest.loc[manifest["has_boxes"], "StudyInstanceUID"]) == boxed & set(uids)
    assert manifest.set_index("StudyInstanceUID").loc[segmented, "has_boxes"].tolist() == old_crops["has_boxes"].tolist()


def test_stage1_inputs_only_for_the_studies_stage_1_reads_and_redone_when_another_needs_one(layout, tmp_path) -> None:
    from rsna_cspine.training.caches import prepared_seg_studies

    kaggle = KaggleLayout(layout)
    segmented = [u for u in _train_uids(layout) if kaggle.segmentation_path(u)]
    first, rest = segmented[0], segmented[1:]
    cache = PreparedCache(tmp_path / "cache")
    prepare_dataset(layout, cache.root, _cfg(), progress=False, stage1_studies=[first])
    manifest = pd.read_csv(cache.root / "manifest.csv", dtype={"StudyInstanceUID": str}, keep_default_na=False)
    rows = manifest.set_index("StudyInstanceUID")
    assert rows.loc[first, "seg_file"] == f"seg/{first}.npz" and cache.seg_path(first).is_file()
    for uid in rest:  # stage 2's crops and masks all the same, without the stage-1 input
        assert rows.loc[uid, "seg_file"] == "" and not cache.seg_path(uid).exists()
        assert rows.loc[uid, "crop_file"] == f"crops/{uid}.npz" and cache.mask_path(uid).is_file()
    crops = {uid: load_crops(cache.crop_path(uid)).images for uid in rest}
    seg_studies = partial(prepared_seg_studies, cache.root, grid=GRID, hu_window=(-400.0, 1600.0), antialias=True,
                          command="rsna-cspine prepare ...")
    assert seg_studies([first]) == {first: cache.seg_path(first)}
    with pytest.raises(LayoutError, match=f"{len(rest)} of the {len(segmented)} studies .* without their stage-1 input"):
        seg_studies(segmented)
    # Prepared again for every study's stage 1: what each study records as its inputs changed, so all are redone.
    summary = prepare_dataset(layout, cache.root, _cfg(), progress=False)
    assert summary.resumed == 0 and all(cache.seg_path(u).is_file() for u in segmented)
    assert sorted(seg_studies(segmented)) == sorted(segmented)
    for uid in rest:  # the crops did not depend on whether the stage-1 input was written
        np.testing.assert_array_equal(load_crops(cache.crop_path(uid)).images, crops[uid])


def test_stage1_models_mask_every_study_from_the_same_decode(layout, tmp_path, monkeypatch) -> None:
    from rsna_cspine.config import to_dict
    from rsna_cspine.engine import save_checkpoint, seed_everything
    from rsna_cspine.seg.config import SegConfig, SegDataConfig, SegModelConfig
    from rsna_cspine.seg.model import build_model
    from rsna_cspine.seg.predict import load_segmenter

    seg_cfg = SegConfig(data=SegDataConfig(grid=GRID), model=SegModelConfig(channels=(4, 8), strides=(2,)))
    seed_everything(2)
    checkpoint = save_checkpoint(tmp_path / "seg" / "fold0" / "best.pt", model=build_model(seg_cfg.model, 8), epoch=0,
                                 config=to_dict(seg_cfg))
    decodes = _count_decodes(monkeypatch)
    summary = prepare_dataset(layout, tmp_path / "cache", _cfg(mask_source="gt_then_pred", device="cpu"),
                              seg_models=tmp_path, progress=False)
    assert summary.done == 5 and decodes == {uid: 1 for uid in _train_uids(layout)}
    cache = PreparedCache(tmp_path / "cache")
    manifest = cache.manifest().set_index("StudyInstanceUID")
    kaggle = KaggleLayout(layout)
    segmenter = load_segmenter(checkpoint, "cpu")
    for uid in _train_uids(layout):
        expected = "gt" if kaggle.segmentation_path(uid) else "pred"
        assert manifest.loc[uid, "mask_source"] == expected and cache.crop_path(uid).is_file()
        if expected == "pred":  # the models' mask, from the image the stage-1 input holds
            alone = segmenter.predict(load_series(kaggle.study_dir(uid, "train"))).mask
            with np.load(cache.mask_path(uid)) as npz:
                np.testing.assert_array_equal(npz["mask"], alone)
            assert len(json.loads((cache.ledger_dir / f"{uid}.json").read_text())["vertebrae"]) == 7
    # The models are part of the settings (by content): other weights are not mixed into this cache.
    seed_everything(3)
    save_checkpoint(checkpoint, model=build_model(seg_cfg.model, 8), epoch=0, config=to_dict(seg_cfg))
    with pytest.raises(ConfigError, match=r"other settings \(differs in \['seg_models'\]\)"):
        prepare_dataset(layout, tmp_path / "cache", _cfg(mask_source="gt_then_pred"), seg_models=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="mask_source='pred' needs stage-1 models"):  # before any study is read
        prepare_dataset(layout, tmp_path / "no_models", _cfg(mask_source="pred"), progress=False)


def test_shards_and_merged_shard_folders_equal_one_unsharded_run(layout, tmp_path) -> None:
    prepare_dataset(layout, tmp_path / "whole", _cfg(), progress=False)
    # Two machines, one folder; the first with two worker processes on a two-core budget.
    first = prepare_dataset(layout, tmp_path / "shared", _cfg(workers=2, cpus=2), shard=(0, 2), progress=False)
    assert (first.done, first.workers, first.threads) == (3, 2, 1)
    second = prepare_dataset(layout, tmp_path / "shared", _cfg(), shard=(1, 2), progress=False)
    assert second.done == 2 and len(second.manifest) == 5  # the manifest lists every shard's studies
    # Two machines, two folders, joined afterwards.
    for index in range(2):
        assert main(["prepare", "--data", str(layout), "--out", str(tmp_path / f"part{index}"), "--shard", f"{index}/2",
                     "--workers", "1", "--no-progress", *SETTINGS]) == 0
    assert main(["prepare", "--merge", str(tmp_path / "part0"), str(tmp_path / "part1"),
                 "--out", str(tmp_path / "merged")]) == 0
    whole = _snapshot(tmp_path / "whole")
    _assert_same(whole, _snapshot(tmp_path / "shared"))
    _assert_same(whole, _snapshot(tmp_path / "merged"))
    assert merge_caches([tmp_path / "part1"], tmp_path / "merged")["status"].eq("done").sum() == 5  # again: no change
    prepare_dataset(layout, tmp_path / "other", _cfg(crop=CropConfig(n_slices=4, channels=3, size=32)),
                    studies=_train_uids(layout)[:1], progress=False)
    with pytest.raises(ConfigError, match=r"other settings than the others \(differs in \['crop'\]\)"):
        merge_caches([tmp_path / "part0", tmp_path / "other"], tmp_path / "mixed")


def _largest_first(root: Path, uids: list[str]) -> list[str]:
    """The studies by decreasing slice files, then bytes (table order among equals), counted here independently."""
    kaggle = KaggleLayout(root)

    def size(uid: str) -> tuple[int, int]:
        files = [p for p in kaggle.study_dir(uid, "train").iterdir() if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    sizes = {uid: size(uid) for uid in uids}
    order = sorted(range(len(uids)), key=lambda k: (-sizes[uids[k]][0], -sizes[uids[k]][1], k))
    return [uids[k] for k in order]


def test_studies_start_largest_first_and_the_cache_does_not_depend_on_the_order(layout, tmp_path, monkeypatch):
    import rsna_cspine.prepare.run as run_module

    uids = _train_uids(layout)
    expected = _largest_first(layout, uids)
    slices = {u: len(list(KaggleLayout(layout).study_dir(u, "train").iterdir())) for u in uids}
    assert len(set(slices.values())) > 1 and expected != uids  # the fixture's studies differ in size
    original, started = run_module.prepare_study, []
    monkeypatch.setattr(run_module, "prepare_study", lambda uid, job: started.append(uid) or original(uid, job))
    prepare_dataset(layout, tmp_path / "largest_first", _cfg(), progress=False)
    assert started == expected and [slices[u] for u in started] == sorted(slices.values(), reverse=True)
    # The same studies one by one in table order (as before the scheduling) give the same cache.
    started.clear()
    for uid in uids:
        prepare_dataset(layout, tmp_path / "table_order", _cfg(), studies=[uid], progress=False)
    assert started == uids
    _assert_same(_snapshot(tmp_path / "largest_first"), _snapshot(tmp_path / "table_order"))
    # A shard is chosen in table order first, then started largest first.
    started.clear()
    prepare_dataset(layout, tmp_path / "shard", _cfg(), shard=(1, 2), progress=False)
    assert started == [u for u in expected if u in uids[1::2]]
    # An empty list of studies is none, not every study (a fold without validation studies, say).
    started.clear()
    assert prepare_dataset(layout, tmp_path / "none", _cfg(), studies=[], progress=False).done == 0 and started == []


def test_a_killed_run_resumes_where_it_stopped_and_equals_an_uninterrupted_one(layout, tmp_path, monkeypatch) -> None:
    import rsna_cspine.prepare.run as run_module

    root = _copy(layout, tmp_path)
    prepare_dataset(root, tmp_path / "straight", _cfg(), progress=False)
    original, ran = run_module.prepare_study, []

    def killed_at_the_third(uid, job):
        if len(ran) == 2:
            raise KeyboardInterrupt  # as Ctrl-C or a SLURM preemption would
        ran.append(uid)
        return original(uid, job)

    monkeypatch.setattr(run_module, "prepare_study", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(root, tmp_path / "cache", _cfg(), progress=False)
    counted = []
    monkeypatch.setattr(run_module, "prepare_study", lambda uid, job: counted.append(uid) or original(uid, job))
    resumed = prepare_dataset(root, tmp_path / "cache", _cfg(), progress=False)
    uids = _train_uids(root)
    assert len(ran) == 2 and counted == [u for u in _largest_first(root, uids) if u not in ran]
    assert (resumed.resumed, resumed.done) == (2, 3)
    _assert_same(_snapshot(tmp_path / "straight"), _snapshot(tmp_path / "cache"))

    # Finished studies are never redone: not on a rerun, only the one whose files changed.
    counted.clear()
    assert prepare_dataset(root, tmp_path / "cache", _cfg(), progress=False).done == 0 and counted == []
    kaggle = KaggleLayout(root)
    changed = next(u for u in uids if kaggle.segmentation_path(u) is None)
    study = kaggle.study_dir(changed, "train")
    max(study.iterdir(), key=lambda p: int(p.stem)).unlink()  # one slice less
    prepare_dataset(root, tmp_path / "cache", _cfg(), progress=False)
    assert counted == [changed]
    manifest = PreparedCache(tmp_path / "cache").manifest().set_index("StudyInstanceUID")
    assert manifest.loc[changed, "n_slices"] == len(list(study.iterdir()))
    # A segmented study that lost a slice no longer fits its label map: it fails, and its stale files are not offered.
    segmented = next(u for u in uids if kaggle.segmentation_path(u) is not None)
    max(kaggle.study_dir(segmented, "train").iterdir(), key=lambda p: int(p.stem)).unlink()
    counted.clear()
    assert prepare_dataset(root, tmp_path / "cache", _cfg(), progress=False).failed.keys() == {segmented}
    manifest = PreparedCache(tmp_path / "cache").manifest().set_index("StudyInstanceUID")
    assert counted == [segmented] and manifest.loc[segmented, "status"] == "failed"
    assert "differs from the volume" in manifest.loc[segmented, "reason"]
    # Other settings are refused in this folder (naming them), or start afresh when asked to.
    with pytest.raises(ConfigError, match=r"differs in \['stage1'\]"):
        prepare_dataset(root, tmp_path / "cache", _cfg(stage1=Stage1InputConfig(grid=(8, 16, 16))), progress=False)
    counted.clear()
    prepare_dataset(root, tmp_path / "cache", _cfg(stage1=Stage1InputConfig(grid=(8, 16, 16))), restart=True,
                    progress=False)
    assert sorted(counted) == sorted(uids)
    with np.load(PreparedCache(tmp_path / "cache").seg_path(changed)) as npz:
        assert npz["image"].shape == (1, 8, 16, 16)


def test_a_corrupt_study_is_listed_as_failed_and_the_rest_are_prepared(layout, tmp_path, capsys) -> None:
    from rsna_cspine.training.caches import prepared_crop_index, prepared_seg_studies

    root = _copy(layout, tmp_path)
    kaggle, uids = KaggleLayout(root), _train_uids(root)
    broken = next(u for u in uids if kaggle.segmentation_path(u))
    saved = tmp_path / "saved"
    shutil.copytree(kaggle.study_dir(broken, "train"), saved)
    for path in kaggle.study_dir(broken, "train").iterdir():
        path.write_bytes(b"not a DICOM file" * 8)
    cache = PreparedCache(tmp_path / "cache")
    args = ["prepare", "--data", str(root), "--out", str(cache.root), "--workers", "1", "--no-progress", *SETTINGS]
    assert main(args) == 1  # the batch finished; the exit code says something failed
    printed = capsys.readouterr().out
    assert f"failed: {broken}: DicomSeriesError" in printed and "prepared 4 studies" in printed
    manifest = cache.manifest().set_index("StudyInstanceUID")
    assert manifest.loc[broken, "status"] == "failed" and "no readable DICOM file" in manifest.loc[broken, "reason"]
    assert (manifest.drop(index=broken)["status"] == "done").all()
    assert json.loads((cache.ledger_dir / "failed" / f"{broken}.json").read_text())["reason"].startswith("DicomSeriesError")
    # The trainers leave it out, with the reason, instead of stopping.
    index = prepared_crop_index(cache.root, uids, CROP, "rsna-cspine prepare ...")
    assert index.set_index("StudyInstanceUID").loc[broken, "status"] == "failed"
    segmented = [u for u in uids if kaggle.segmentation_path(u)]
    assert sorted(prepared_seg_studies(cache.root, segmented, GRID, (-400.0, 1600.0), True, "...")) == sorted(
        set(segmented) - {broken})
    # Repaired, it is prepared by the next run and no longer listed as failed.
    shutil.rmtree(kaggle.study_dir(broken, "train"))
    shutil.copytree(saved, kaggle.study_dir(broken, "train"))
    assert main(args) == 0
    assert cache.manifest()["status"].eq("done").all() and not (cache.ledger_dir / "failed" / f"{broken}.json").exists()


def test_trainers_train_from_a_prepared_cache_without_touching_dicom(layout, tmp_path, monkeypatch) -> None:
    import rsna_cspine.io.dicom as dicom
    import rsna_cspine.io.dicom.series as series

    root = _copy(layout, tmp_path)
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(root), "--out", str(cache), "--workers", "1", "--no-progress",
                 "--seg-config", "configs/seg_cpu.yaml", "--cls-config", "configs/cls_cpu.yaml", *SETTINGS]) == 0
    shutil.rmtree(root / "train_images")  # prove it: no DICOM left to read
    shutil.rmtree(root / "test_images")

    def no_decoding(*args, **kwargs):
        raise AssertionError("a trainer tried to load DICOM")

    monkeypatch.setattr(dicom, "load_series", no_decoding)
    monkeypatch.setattr(series, "load_series", no_decoding)
    seg = ["train-seg", "--config", "configs/seg_cpu.yaml", "--fold", "0", "--no-progress", "--cache", str(cache),
           f"data.root={root}", f"run_dir={tmp_path / 'seg'}", "data.grid=[16,32,32]", "model.channels=[4,8]",
           "model.strides=[2]", "train.patch_size=[0,0,0]", "train.epochs=1", "train.n_folds=2", "train.max_minutes=0"]
    assert main(seg) == 0 and (tmp_path / "seg" / "fold0" / "best.pt").is_file()
    cls = ["train-cls", "--config", "configs/cls_cpu.yaml", "--fold", "0", "--no-progress", "--cache", str(cache),
           f"data.root={root}", f"run_dir={tmp_path / 'cls'}", "data.crop.n_slices=4", "data.crop.channels=3",
           "data.crop.size=24", "model.hidden=8", "train.epochs=1", "train.n_folds=2", "train.max_minutes=0"]
    assert main(cls) == 0 and (tmp_path / "cls" / "fold0" / "best.pt").is_file()
    oof = pd.read_csv(tmp_path / "cls" / "oof_fold0.csv", dtype={"StudyInstanceUID": str})
    assert set(oof["StudyInstanceUID"]) <= {u for u in _train_uids(layout) if KaggleLayout(layout).segmentation_path(u)}
    with pytest.raises(LayoutError, match="rsna-cspine prepare"):  # another cache folder: nothing to read
        main([*cls[:7], str(tmp_path / "empty"), *cls[8:]])


def test_the_cpu_budget_is_shared_and_moved_training_keys_say_where_they_went() -> None:
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.config import load_config

    assert split_cpus(2, 2) == (2, 1) and split_cpus(2, 1) == (1, 2) and split_cpus(32, 8) == (8, 4)
    assert split_cpus(2, 5) == (2, 1)  # never more studies (or threads) at once than cores
    workers, threads = PrepareConfig(cpus=4).cpu_plan()
    assert 1 <= workers <= 4 and workers * threads <= 4
    with pytest.raises(ConfigError, match=r"'data.mask_source' moved to rsna-cspine prepare"):
        load_config(ClsConfig, None, ["data.mask_source=gt"])

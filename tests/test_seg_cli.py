"""``rsna-cspine train-seg`` / ``predict-seg`` end to end on a tiny synthetic Kaggle layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("rsna_cspine.synth")
pytest.importorskip("rsna_cspine.io.dicom")
pytest.importorskip("rsna_cspine.io.nifti")

from rsna_cspine.cli import main  # noqa: E402
from rsna_cspine.seg.masks import VERTEBRA_COLUMNS  # noqa: E402
from rsna_cspine.seg.qc import QC_COLUMNS  # noqa: E402

TINY = [
    "data.grid=[16,32,32]", "model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=0",
    "train.epochs=1", "train.batch_size=2", "train.n_folds=2", "optim.warmup_epochs=0", "device=cpu",
    "aug.enabled=false",
]
#: The cascade at the same tiny size: a 2-level localiser on a 16×16×16 coarse grid of 6×4×4 mm.
CASCADE = [
    "data.spacing=[4.0,3.0,3.0]", "localiser.enabled=true", "localiser.grid=[16,16,16]", "localiser.epochs=1",
    "localiser.model.channels=[4,8]", "localiser.model.strides=[2]",
]
#: The stage-1 input ``prepare`` writes for :data:`CASCADE` (data.box_margin_mm and localiser.spacing at their defaults).
PREPARE_CASCADE = ["stage1.spacing=[4.0,3.0,3.0]", "stage1.box_margin_mm=[30.0,20.0,20.0]",
                   "stage1.localiser_spacing=[6.0,4.0,4.0]"]


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory) -> Path:
    from rsna_cspine.synth import SynthConfig, write_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(n_studies=5, seed=3, image_size=48, n_slices=(30, 36), test_fraction=0.2),
                  progress=False)
    return root


@pytest.mark.parametrize("cascade", [False, True], ids=["whole-volume", "cascade"])
def test_prepare_train_then_predict_from_the_command_line(tiny_layout, tmp_path, cascade) -> None:
    run_dir = tmp_path / "run" / "fold0"  # run_dir/fold{K}
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(tiny_layout), "--out", str(cache), "--segmented-only", "--workers", "1",
                 "--no-progress", "stage1.grid=[16,32,32]", "crop.size=16", "crop.n_slices=2",
                 *(PREPARE_CASCADE if cascade else [])]) == 0
    assert len(list((cache / "seg").glob("*.npz"))) == 4  # the four segmented train studies
    args = ["train-seg", "--fold", "0", "--no-progress", f"data.root={tiny_layout}", "--cache", str(cache),
            f"run_dir={run_dir.parent}", *TINY, *(CASCADE if cascade else [])]
    assert main(args) == 0
    assert (run_dir / "best.pt").is_file() and (run_dir / "config.yaml").is_file()
    stored = torch.load(run_dir / "best.pt", weights_only=False)["extra"]
    assert ("localiser" in stored) == cascade  # the checkpoint carries its localiser
    if cascade:
        assert (run_dir / "localiser" / "best.pt").is_file()
    # Resuming a finished 1-epoch run is a no-op that still succeeds.
    assert main([*args, "--resume"]) == 0
    assert pd.read_csv(run_dir / "summary.csv")["epoch"].tolist() == [1]

    out = tmp_path / "pred"
    predict = ["predict-seg", "--data", str(tiny_layout), "--split", "test", "--checkpoint",
               str(run_dir / "best.pt"), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(predict) == 0
    table = pd.read_csv(out / "vertebrae.csv", dtype={"StudyInstanceUID": str})
    uid = pd.read_csv(tiny_layout / "test.csv", dtype=str)["StudyInstanceUID"].iloc[0]
    assert table.columns.tolist() == ["StudyInstanceUID", *VERTEBRA_COLUMNS, *QC_COLUMNS]
    assert table["StudyInstanceUID"].tolist() == [uid] * 7
    n_files = len(list((tiny_layout / "test_images" / uid).glob("*.dcm")))
    with np.load(out / f"{uid}_mask.npz") as npz:
        assert npz["mask"].dtype == np.uint8 and npz["mask"].shape == (n_files, 48, 48)
        assert sorted(npz["slice_numbers"].tolist()) == list(range(1, n_files + 1))
    # A second run finds everything done and leaves the table alone.
    assert main(predict) == 0
    assert len(pd.read_csv(out / "vertebrae.csv")) == 7


def test_predict_seg_lists_a_broken_study_and_goes_on(tiny_layout, tmp_path) -> None:
    from rsna_cspine.config import to_dict
    from rsna_cspine.engine import save_checkpoint
    from rsna_cspine.seg.config import SegConfig, SegDataConfig, SegModelConfig
    from rsna_cspine.seg.model import build_model

    cfg = SegConfig(data=SegDataConfig(grid=(16, 32, 32)), model=SegModelConfig(channels=(4, 8), strides=(2,)))
    checkpoint = save_checkpoint(tmp_path / "m.pt", model=build_model(cfg.model, 8), epoch=0, config=to_dict(cfg))
    uid = pd.read_csv(tiny_layout / "test.csv", dtype=str)["StudyInstanceUID"].iloc[0]
    out = tmp_path / "pred"
    code = main(["predict-seg", "--data", str(tiny_layout), "--split", "test", "--checkpoint", str(checkpoint),
                 "--out", str(out), "--studies", "1.2.3.missing", uid, "--device", "cpu", "--no-progress"])
    assert code == 1
    failures = pd.read_csv(out / "predict_failures.csv", dtype=str)
    assert failures["StudyInstanceUID"].tolist() == ["1.2.3.missing"]
    assert (out / f"{uid}_mask.npz").is_file()


def test_train_seg_refuses_a_missing_or_foreign_cache_and_prepare_fills_it(tiny_layout, tmp_path, monkeypatch) -> None:
    from rsna_cspine.config import load_config
    from rsna_cspine.errors import ConfigError, LayoutError
    from rsna_cspine.seg.config import SegConfig
    from rsna_cspine.seg.train import labelled_studies, segmentation_data, train_segmentation

    overrides = [f"data.root={tiny_layout}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", *TINY]
    cfg = load_config(SegConfig, None, overrides)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the cache must exist before the group is joined
    with pytest.raises(LayoutError, match=r"no prepared cache here.*rsna-cspine prepare --data"):
        train_segmentation(cfg, progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    uids = labelled_studies(tiny_layout)
    prepare = ["prepare", "--data", str(tiny_layout), "--out", str(tmp_path / "cache"), "--workers", "1",
               "--no-progress", "crop.size=16", "crop.n_slices=2"]
    assert main([*prepare, "stage1.grid=[16,32,32]", "--studies", *uids[:3]]) == 0
    with pytest.raises(LayoutError, match=rf"1 of 4 studies neither prepared nor failed.*{uids[3]}"):
        train_segmentation(cfg, progress=False)
    assert main([*prepare, "stage1.grid=[16,32,32]"]) == 0
    ready = segmentation_data(cfg)
    assert sorted(ready) == uids and all(p.is_file() for p in ready.values())
    other = load_config(SegConfig, None, [*overrides, "data.grid=[32,32,32]"])
    with pytest.raises(ConfigError, match=r"other stage-1 input settings.*grid: cache \[16, 32, 32\], config \[32, 32, 32\]"):
        train_segmentation(other, progress=False)
    cascade = load_config(SegConfig, None, [*overrides, *CASCADE])  # a whole-volume cache cannot train the cascade
    with pytest.raises(ConfigError, match=r"spacing: cache \[\], config \[4.0, 3.0, 3.0\]"):
        train_segmentation(cascade, progress=False)
    assert not (tmp_path / "run").exists()


def test_predict_seg_shards_fill_one_folder_and_other_weights_redo_it(tiny_layout, tmp_path) -> None:
    from rsna_cspine.config import to_dict
    from rsna_cspine.engine import save_checkpoint, seed_everything
    from rsna_cspine.seg.config import SegConfig, SegDataConfig, SegModelConfig
    from rsna_cspine.seg.model import build_model

    cfg = SegConfig(data=SegDataConfig(grid=(16, 32, 32)), model=SegModelConfig(channels=(4, 8), strides=(2,)))
    seed_everything(1)
    checkpoint = save_checkpoint(tmp_path / "m.pt", model=build_model(cfg.model, 8), epoch=0, config=to_dict(cfg))
    uids = pd.read_csv(tiny_layout / "train.csv", dtype=str)["StudyInstanceUID"].tolist()
    out = tmp_path / "pred"
    base = ["predict-seg", "--data", str(tiny_layout), "--split", "train", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    for index in range(2):  # two machines, one folder
        assert main([*base, "--checkpoint", str(checkpoint), "--shard", f"{index}/2"]) == 0
        table = pd.read_csv(out / "vertebrae.csv", dtype={"StudyInstanceUID": str})
        done = [u for k, u in enumerate(uids) if k % 2 <= index]  # shard 0, then shards 0 and 1
        assert sorted(table["StudyInstanceUID"].unique()) == sorted(done) and len(table) == 7 * len(done)
    assert sorted(table["StudyInstanceUID"].unique()) == sorted(uids)
    stamps = {u: (out / f"{u}_mask.npz").stat().st_mtime_ns for u in uids}
    assert main([*base, "--checkpoint", str(checkpoint)]) == 0  # everything finished: nothing rewritten
    assert {u: (out / f"{u}_mask.npz").stat().st_mtime_ns for u in uids} == stamps
    # Other weights: the earlier masks are not theirs, every study is segmented again.
    seed_everything(2)
    other = save_checkpoint(tmp_path / "other.pt", model=build_model(cfg.model, 8), epoch=0, config=to_dict(cfg))
    assert main([*base, "--checkpoint", str(other)]) == 0
    assert all((out / f"{u}_mask.npz").stat().st_mtime_ns != stamps[u] for u in uids)
    assert len(pd.read_csv(out / "vertebrae.csv")) == 7 * len(uids)

"""A toy stage-2 task (a crop cache where a fractured vertebra shows a bright square) and a tiny run config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsna_cspine.cls.config import ClsConfig, ClsTrainConfig
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.crops import CropConfig, VertebraCrops, save_crops
from rsna_cspine.engine import fold_of
from rsna_cspine.prepare import PrepareConfig, PreparedCache, settings_fingerprint

N_SLICES, CHANNELS, SIZE = 6, 3, 32
CROP = CropConfig(n_slices=N_SLICES, channels=CHANNELS, size=SIZE)
ABSENT_VERTEBRA = 3  # one study has no C4 in its mask


def toy_uid(i: int) -> str:
    """The ``i``-th toy study's UID."""
    return f"1.2.826.0.1.3680043.{1000 + i}"


def absent_study(n_studies: int) -> int:
    """A study of validation fold 0 (3 folds, fold seed 42), so the OOF file shows the prior fallback."""
    folds = fold_of([toy_uid(i) for i in range(n_studies)], 3, 42)
    return min(i for i in range(n_studies) if folds[toy_uid(i)] == 0)


def save_prepared(cache: str | Path, uid: str, crops: VertebraCrops, crop: CropConfig = CROP, mask_source: str = "gt") -> None:
    """One study's crops as ``rsna-cspine prepare`` leaves them: the crop file and its ledger record."""
    prepared = PreparedCache(cache)
    name = prepared.relative(save_crops(prepared.crop_path(uid), crops, mask_source=mask_source))
    record = {"crop_file": name, "mask_source": mask_source, "n_present": int(crops.present.sum()), "outputs": [name]}
    prepared.ledger(settings_fingerprint(PrepareConfig(crop=crop), [], "train")).save(uid, record)


def toy_crop_dataset(tmp_path: Path, n_studies: int = 14, seed: int = 0) -> tuple[str, str]:
    """train.csv + a prepared cache whose crops show a bright square on slices 2..4 of a fractured vertebra."""
    rng = np.random.default_rng(seed)
    absent = absent_study(n_studies)
    root, cache = tmp_path / "kaggle", tmp_path / "crops"
    root.mkdir()
    rows = []
    for s in range(n_studies):
        labels = (rng.random(7) < 0.35).astype(int)
        images = rng.integers(0, 80, size=(7, N_SLICES, CHANNELS, SIZE, SIZE)).astype(np.uint8)
        slice_labels = np.zeros((7, N_SLICES), dtype=np.int8)
        box_maps = np.zeros((7, N_SLICES, SIZE, SIZE), dtype=np.uint8)
        for v in np.flatnonzero(labels):
            y, x = rng.integers(4, SIZE - 14, size=2)
            images[v, 2:5, :, y : y + 10, x : x + 10] = 230
            slice_labels[v, 2:5] = 1
            box_maps[v, 2:5, y : y + 10, x : x + 10] = 1
        present = np.ones(7, dtype=bool)
        if s == absent:
            present[ABSENT_VERTEBRA] = False
            images[ABSENT_VERTEBRA] = 0
        crops = VertebraCrops(
            images=images,
            present=present,
            slice_index=np.tile(np.arange(N_SLICES, dtype=np.int32) * 2, (7, 1)),
            z_range=np.tile(np.array([0, 2 * N_SLICES - 2], dtype=np.int32), (7, 1)),
            boxes=np.tile(np.array([0, SIZE, 0, SIZE], dtype=np.int32), (7, 1)),
            slice_labels=np.where(present[:, None], slice_labels, -1).astype(np.int8),
            box_maps=box_maps,
        )
        save_prepared(cache, toy_uid(s), crops)
        rows.append({"StudyInstanceUID": toy_uid(s), **dict(zip(VERTEBRAE, labels)), "patient_overall": int(labels.max())})
    pd.DataFrame(rows)[["StudyInstanceUID", *TARGET_COLUMNS]].to_csv(root / "train.csv", index=False)
    return str(root), str(cache)


def tiny_cls_config(tmp_path: Path, root: str, cache: str, run: str, **train: object) -> ClsConfig:
    """A tiny CPU run of fold 0 of 3; ``train`` sets fields of the ``train:`` section."""
    cfg = ClsConfig(run_dir=str(tmp_path / run), fold=0, device="cpu",
                    train=ClsTrainConfig(n_folds=3, epochs=2, batch_size=8, val_batch_size=16, amp=False, threads=1,
                                         patience=0, slice_loss_weight=0.3, num_workers=0))
    cfg.data.root, cfg.data.cache_dir = root, cache
    cfg.data.crop = CROP
    cfg.model.backbone, cfg.model.hidden, cfg.model.head = "test_resnet", 16, "gru"
    cfg.optim.lr, cfg.optim.warmup_epochs = 2e-3, 0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg

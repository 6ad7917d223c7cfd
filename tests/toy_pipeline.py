"""Tiny real models and a tiny Kaggle-layout test set for the end-to-end tests (pipeline, CLI, notebook, bundle,
explain, viewer).

The models are real but tiny and untrained (a MONAI UNet and timm's ``test_resnet`` built through the
project's factories and saved with ``engine.save_checkpoint``); the studies are real DICOM series written
with pydicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsna_cspine.calibration import PatientCalibration
from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.model import build_classifier
from rsna_cspine.config import to_dict
from rsna_cspine.constants import PROB_EPS, TARGET_COLUMNS
from rsna_cspine.engine import save_checkpoint, seed_everything
from rsna_cspine.io.kaggle import read_test_csv, read_train_labels
from rsna_cspine.metric import prior_predictions
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.model import build_model
from rsna_cspine.seg.preprocess import num_classes
from tests.dicom_factory import axial_positions, write_series

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
        write_toy_series(root / "test_images", uid, seed + k)
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


def write_toy_series(images: Path, uid: str, seed: int, n_slices: int = 16, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    spine = (yy - size * 0.6) ** 2 + (xx - size / 2) ** 2 < (size * 0.12) ** 2
    hu = np.where(body, 40.0, -1000.0) + np.where(spine, 700.0, 0.0)
    values = hu[None] + rng.normal(0.0, 30.0, size=(n_slices, size, size))
    write_series(images / uid, np.rint(values).astype(np.int16), axial_positions(n_slices), study_uid=uid, intercepts=[0.0] * n_slices)


def expected_prior_submission(data: Path) -> pd.DataFrame:
    """The pipeline's prior (train.csv prevalence, clipped as every submission is) for every test.csv row, in order."""
    test = read_test_csv(data / "test.csv")
    prior = prior_predictions(read_train_labels(data / "train.csv")).clip(PROB_EPS, 1 - PROB_EPS)
    prior = dict(zip(TARGET_COLUMNS, prior))
    return pd.DataFrame({"row_id": test["row_id"], "fractured": test["prediction_type"].map(prior)})


def assert_prior_submission(out: Path, data: Path) -> None:
    """``out`` holds the training prior for every test.csv row, in test.csv order."""
    written = pd.read_csv(out, dtype={"row_id": str})
    expected = expected_prior_submission(data)
    assert written["row_id"].tolist() == expected["row_id"].tolist()
    np.testing.assert_allclose(written["fractured"].to_numpy(), expected["fractured"].to_numpy(), rtol=1e-12)
    assert written["fractured"].nunique() > 1  # per-target prevalence, not one constant

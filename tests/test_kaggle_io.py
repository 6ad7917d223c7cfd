"""Kaggle layout paths and the checked CSV readers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rsna_cspine.errors import LayoutError
from rsna_cspine.io.kaggle import (
    KaggleLayout,
    read_bounding_boxes,
    read_test_csv,
    read_train_labels,
    studies_without_images,
    test_studies,
)

TRAIN_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
TRAIN_ROWS = (
    "1.2.826.0.1.3680043.6200,1,1,1,0,0,0,0,0\n"
    "1.2.826.0.1.3680043.27262,1,0,1,0,0,0,0,0\n"
    "1.2.826.0.1.3680043.21561,0,0,0,0,0,0,0,0\n"
)
TEST_TEXT = (
    "row_id,StudyInstanceUID,prediction_type\n"
    "1.2.826.0.1.3680043.10197_C1,1.2.826.0.1.3680043.10197,C1\n"
    "1.2.826.0.1.3680043.10454_C1,1.2.826.0.1.3680043.10454,C1\n"
    "1.2.826.0.1.3680043.10690_C1,1.2.826.0.1.3680043.10690,C1\n"
    "1.2.826.0.1.3680043.10197_patient_overall,1.2.826.0.1.3680043.10197,patient_overall\n"
)
BOX_TEXT = (
    "StudyInstanceUID,x,y,width,height,slice_number\n"
    "1.2.826.0.1.3680043.10051,219.27715,216.71419,17.30440,20.38517,133\n"
    "1.2.826.0.1.3680043.10051,221.5646,216.71419,17.30440,20.38517,134\n"
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_layout_paths(tmp_path: Path) -> None:
    layout = KaggleLayout(str(tmp_path))
    assert layout.train_csv == tmp_path / "train.csv"
    assert layout.test_csv == tmp_path / "test.csv"
    assert layout.sample_submission_csv == tmp_path / "sample_submission.csv"
    assert layout.bounding_boxes_csv == tmp_path / "train_bounding_boxes.csv"
    assert layout.study_dir("1.2.3", "train") == tmp_path / "train_images" / "1.2.3"
    assert layout.study_dir("1.2.3", "test") == tmp_path / "test_images" / "1.2.3"
    with pytest.raises(ValueError, match="split"):
        layout.study_dir("1.2.3", "valid")
    layout.segmentations.mkdir()
    assert layout.segmentation_path("1.2.3") is None
    (layout.segmentations / "1.2.3.nii.gz").write_bytes(b"x")
    assert layout.segmentation_path("1.2.3") == layout.segmentations / "1.2.3.nii.gz"
    (layout.segmentations / "1.2.3.nii").write_bytes(b"x")
    assert layout.segmentation_path("1.2.3") == layout.segmentations / "1.2.3.nii"


def test_read_train_labels(tmp_path: Path) -> None:
    labels = read_train_labels(_write(tmp_path, "train.csv", TRAIN_HEADER + TRAIN_ROWS))
    assert labels.StudyInstanceUID.tolist()[0] == "1.2.826.0.1.3680043.6200"
    assert labels["C2"].tolist() == [1, 1, 0] and labels["C2"].dtype == np.int64
    assert labels["patient_overall"].sum() == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6\n1.2,0,0,0,0,0,0,0\n", r"missing columns \['C7'\]"),
        (TRAIN_HEADER + "1.2,0,0,0,2,0,0,0,0\n", r"column C3 must be 0/1.*1\.2=2"),
        (TRAIN_HEADER + "1.2,0,0,0,0,0,,0,0\n", r"column C5 must be 0/1"),
        (TRAIN_HEADER + "1.2,0,0,0,0,0,0,yes,0\n", r"column C6 must be 0/1.*'yes'"),
        (
            TRAIN_HEADER + TRAIN_ROWS + "1.2.826.0.1.3680043.21561,0,0,0,0,0,0,0,0\n",
            r"duplicated StudyInstanceUID.*21561",
        ),
        (TRAIN_HEADER + ",0,0,0,0,0,0,0,0\n", "empty StudyInstanceUID"),
        ("", "not a readable CSV"),
    ],
)
def test_train_label_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "train.csv", text)
    with pytest.raises(LayoutError, match=message) as info:
        read_train_labels(path)
    assert str(path) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="nope.csv: file not found"):
        read_train_labels(tmp_path / "nope.csv")


def test_inconsistent_patient_overall_warns(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.csv", TRAIN_HEADER + "1.2.9,0,0,1,0,0,0,0,0\n1.2.8,1,0,0,0,0,0,0,0\n")
    with pytest.warns(UserWarning, match=r"patient_overall differs.*1\.2\.9.*1\.2\.8"):
        labels = read_train_labels(path)
    assert len(labels) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_train_labels(_write(tmp_path, "ok.csv", TRAIN_HEADER + TRAIN_ROWS))


def test_read_test_csv_and_studies(tmp_path: Path) -> None:
    test = read_test_csv(_write(tmp_path, "test.csv", TEST_TEXT))
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert len(test) == 4
    assert test_studies(test) == [
        "1.2.826.0.1.3680043.10197",
        "1.2.826.0.1.3680043.10454",
        "1.2.826.0.1.3680043.10690",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("row_id,StudyInstanceUID\n1.2_C1,1.2\n", r"missing columns \['prediction_type'\]"),
        (TEST_TEXT + "1.2_C8,1.2,C8\n", r"unknown prediction_type.*'C8'"),
        (TEST_TEXT + "1.2.826.0.1.3680043.10454_C1,1.2.826.0.1.3680043.10454,C1\n", r"duplicated row_id.*10454_C1"),
        (TEST_TEXT + "other_id,1.2.826.0.1.3680043.10454,C1\n", r"duplicated \(StudyInstanceUID, prediction_type\)"),
    ],
)
def test_test_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "test.csv", text)
    with pytest.raises(LayoutError, match=message) as info:
        read_test_csv(path)
    assert str(path) in str(info.value)


def test_test_csv_row_id_mismatch_warns_and_keeps_given_id(tmp_path: Path) -> None:
    path = _write(tmp_path, "test.csv", "row_id,StudyInstanceUID,prediction_type\nodd,1.2,C3\n")
    with pytest.warns(UserWarning, match="row_id differs"):
        test = read_test_csv(path)
    assert test.row_id.tolist() == ["odd"]


def test_read_bounding_boxes(tmp_path: Path) -> None:
    boxes = read_bounding_boxes(_write(tmp_path, "boxes.csv", BOX_TEXT))
    assert boxes.slice_number.tolist() == [133, 134] and boxes.slice_number.dtype == np.int64
    assert boxes.width.iloc[0] == pytest.approx(17.3044)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("StudyInstanceUID,x,y,width,slice_number\n1.2,1,1,1,1\n", r"missing columns \['height'\]"),
        (BOX_TEXT + "1.2,1,1,0,5,3\n", "width and height must be > 0"),
        (BOX_TEXT + "1.2,abc,1,2,5,3\n", "column x must be finite"),
        (BOX_TEXT + "1.2,1,1,2,5,3.5\n", "slice_number must be a non-negative integer"),
    ],
)
def test_bounding_box_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "boxes.csv", text)
    with pytest.raises(LayoutError, match=message) as info:
        read_bounding_boxes(path)
    assert str(path) in str(info.value)


def test_studies_without_images(tmp_path: Path) -> None:
    layout = KaggleLayout(tmp_path)
    (layout.test_images / "1.1").mkdir(parents=True)
    (layout.test_images / "1.1" / "1.dcm").write_bytes(b"")
    (layout.test_images / "2.2").mkdir()  # empty folder
    (layout.test_images / "4.4").mkdir()
    (layout.test_images / "4.4" / "notes.txt").write_text("no dicom here")
    uids = ["1.1", "2.2", "3.3", "4.4"]
    assert studies_without_images(layout, uids, "test") == ["2.2", "3.3", "4.4"]
    assert studies_without_images(layout, ["1.1"], "train") == ["1.1"]


def test_uids_stay_strings(tmp_path: Path) -> None:
    # A UID such as "1.20" would become the float 1.2 if pandas guessed the type.
    labels = read_train_labels(_write(tmp_path, "train.csv", TRAIN_HEADER + "1.20,0,0,0,0,0,0,0,0\n"))
    assert labels.StudyInstanceUID.tolist() == ["1.20"]
    test = read_test_csv(_write(tmp_path, "test.csv", "row_id,StudyInstanceUID,prediction_type\n1.20_C1,1.20,C1\n"))
    assert test_studies(test) == ["1.20"]
    assert isinstance(pd.DataFrame(test).StudyInstanceUID.iloc[0], str)

"""The Kaggle competition layout: where files live, and checked readers for its CSV tables."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import LayoutError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
TRAIN_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", *TARGET_COLUMNS)
TEST_COLUMNS: tuple[str, ...] = ("row_id", "StudyInstanceUID", "prediction_type")
BOX_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
_MAX_EXAMPLES = 5


def _examples(values: Iterable) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_MAX_EXAMPLES])
    more = f" (+{len(values) - _MAX_EXAMPLES} more)" if len(values) > _MAX_EXAMPLES else ""
    return f"{len(values)}: {shown}{more}"


@dataclass
class KaggleLayout:
    """Paths of the competition folder (``/kaggle/input/rsna-2022-cervical-spine-fracture-detection``).

    Attributes:
        root: the competition folder.
    """

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def test_csv(self) -> Path:
        return self.root / "test.csv"

    @property
    def sample_submission_csv(self) -> Path:
        return self.root / "sample_submission.csv"

    @property
    def bounding_boxes_csv(self) -> Path:
        return self.root / "train_bounding_boxes.csv"

    @property
    def train_images(self) -> Path:
        return self.root / "train_images"

    @property
    def test_images(self) -> Path:
        return self.root / "test_images"

    @property
    def segmentations(self) -> Path:
        return self.root / "segmentations"

    def study_dir(self, uid: str, split: str) -> Path:
        """Folder of one study's DICOM files.

        Args:
            uid: StudyInstanceUID.
            split: ``"train"`` or ``"test"``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return (self.train_images if split == "train" else self.test_images) / uid

    def study_path(self, uid: str, split: str) -> Path:
        """Where one study's images are: its folder of DICOM files, else ``<uid>.nii.gz``, ``<uid>.nii`` or
        ``<uid>.dcm`` (a NIfTI or Enhanced CT file, as ``rsna-cspine import-labels`` writes) beside it.

        Args:
            uid: StudyInstanceUID.
            split: ``"train"`` or ``"test"``.
        """
        folder = self.study_dir(uid, split)
        if not folder.is_dir():
            for suffix in (".nii.gz", ".nii", ".dcm"):
                candidate = folder.with_name(uid + suffix)
                if candidate.is_file():
                    return candidate
        return folder

    def segmentation_path(self, uid: str) -> Path | None:
        """The study's segmentation NIfTI (``.nii``, else ``.nii.gz``), or ``None`` if it has none.

        Args:
            uid: StudyInstanceUID.
        """
        for suffix in (".nii", ".nii.gz"):
            path = self.segmentations / f"{uid}{suffix}"
            if path.is_file():
                return path
        return None


def _read_csv(path: str | Path, required: Iterable[str]) -> pd.DataFrame:
    """Read a CSV with ids as strings and check that ``required`` columns are present."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError("file not found", path)
    try:
        # Ids as str: a UID such as "1.2.3" must never be parsed as a number.
        frame = pd.read_csv(path, dtype={"StudyInstanceUID": str, "row_id": str, "prediction_type": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LayoutError(f"not a readable CSV ({exc})", path) from exc
    _require_columns(frame, required, path)
    return frame


def _require_columns(frame: pd.DataFrame, required: Iterable[str], source: str | Path) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise LayoutError(f"missing columns {missing}; found {list(frame.columns)}", source)


def _check_uids(frame: pd.DataFrame, source: str | Path) -> pd.Series:
    uids = frame["StudyInstanceUID"]
    empty = uids.isna() | (uids.astype(str).str.strip() == "")
    if empty.any():
        raise LayoutError(f"empty StudyInstanceUID in rows {_examples(frame.index[empty])}", source)
    return uids.astype(str).str.strip()


def unknown_label_rows(labels: pd.DataFrame) -> pd.Series:
    """Rows whose fracture labels are unknown: every target cell empty (studies imported for stage 1 only).

    Args:
        labels: a train.csv-like table.
    """
    targets = labels[list(TARGET_COLUMNS)].astype(str).apply(lambda column: column.str.strip())
    return (labels[list(TARGET_COLUMNS)].isna() | targets.isin(("", "nan"))).all(axis=1)


def check_train_labels(
    labels: pd.DataFrame, source: str | Path = "train labels", *, keep_unknown: bool = False
) -> pd.DataFrame:
    """Validate a train.csv-like table (already in memory).

    A row whose eight target cells are all empty is a study with unknown fracture labels (``rsna-cspine
    import-labels`` writes such rows for stage-1 training data): it is left out, with a log line, so that
    stage 2, the prior and scoring never see it; ``keep_unknown`` keeps it (stage 1 needs only the study).

    Args:
        labels: ``StudyInstanceUID`` and 0/1 columns ``C1..C7, patient_overall``; extra columns kept.
        source: file name (or description) used in error messages.
        keep_unknown: keep the rows with unknown labels (their targets are then float NaN).

    Returns:
        A copy with ``StudyInstanceUID`` as str and targets as int64 (float64 with NaN when unknown rows
        are kept).

    Raises:
        LayoutError: missing columns, empty or duplicated StudyInstanceUID, non-0/1 targets (a row with
            only some targets empty included).
    """
    _require_columns(labels, TRAIN_COLUMNS, source)
    labels = labels.copy()
    labels["StudyInstanceUID"] = _check_uids(labels, source)
    duplicated = labels["StudyInstanceUID"][labels["StudyInstanceUID"].duplicated()].unique()
    if len(duplicated):
        raise LayoutError(f"duplicated StudyInstanceUID {_examples(duplicated)}", source)
    unknown = unknown_label_rows(labels)
    if unknown.any():
        uids = labels["StudyInstanceUID"][unknown]
        if keep_unknown:
            known = check_train_labels(labels[~unknown], source)
            rest = labels[unknown].assign(**{column: np.nan for column in TARGET_COLUMNS})
            merged = pd.concat([known.astype({c: np.float64 for c in TARGET_COLUMNS}), rest])
            return merged.loc[labels.index]
        logger.info("%s: %d studies with unknown fracture labels left out (stage-1 data only): %s", source,
                    int(unknown.sum()), _examples(uids))
        labels = labels[~unknown].reset_index(drop=True)
    for column in TARGET_COLUMNS:
        values = pd.to_numeric(labels[column], errors="coerce")
        bad = ~values.isin((0, 1))
        if bad.any():
            examples = [f"{uid}={raw!r}" for uid, raw in zip(labels["StudyInstanceUID"][bad], labels[column][bad])]
            raise LayoutError(f"column {column} must be 0/1; bad rows {_examples(examples)}", source)
        labels[column] = values.astype(np.int64)
    any_vertebra = labels[list(VERTEBRAE)].max(axis=1)
    inconsistent = labels["StudyInstanceUID"][labels["patient_overall"] != any_vertebra]
    if len(inconsistent):
        # Not fatal: the competition scores each column as given, but it hints at a mangled file.
        warnings.warn(
            f"{source}: patient_overall differs from max(C1..C7) for studies {_examples(inconsistent)}",
            UserWarning,
            stacklevel=2,
        )
    return labels


def check_test_frame(test: pd.DataFrame, source: str | Path = "test table") -> pd.DataFrame:
    """Validate a test.csv-like table (already in memory).

    ``row_id`` is what the grader keys on, so it is kept as given; when it is absent it is built as
    ``f"{StudyInstanceUID}_{prediction_type}"``, and a given one that differs from that is warned about.

    Args:
        test: ``StudyInstanceUID``, ``prediction_type`` and (normally) ``row_id``.
        source: file name (or description) used in error messages.

    Returns:
        A copy with the three columns as str, rows in the original order.

    Raises:
        LayoutError: missing columns, empty ids, unknown prediction_type, duplicated row_ids or
            duplicated (StudyInstanceUID, prediction_type) pairs.
    """
    _require_columns(test, ("StudyInstanceUID", "prediction_type"), source)
    test = test.copy()
    test["StudyInstanceUID"] = _check_uids(test, source)
    test["prediction_type"] = test["prediction_type"].astype(str).str.strip()
    unknown = test["prediction_type"][~test["prediction_type"].isin(TARGET_COLUMNS)].unique()
    if len(unknown):
        raise LayoutError(f"unknown prediction_type {_examples(unknown)}; expected {TARGET_COLUMNS}", source)
    expected_ids = test["StudyInstanceUID"] + "_" + test["prediction_type"]
    if "row_id" not in test.columns:
        test["row_id"] = expected_ids
    test["row_id"] = test["row_id"].astype(str).str.strip()
    duplicated = test["row_id"][test["row_id"].duplicated()].unique()
    if len(duplicated):
        raise LayoutError(f"duplicated row_id {_examples(duplicated)}", source)
    pairs = expected_ids[expected_ids.duplicated()].unique()
    if len(pairs):
        raise LayoutError(f"duplicated (StudyInstanceUID, prediction_type) {_examples(pairs)}", source)
    mismatched = test["row_id"][test["row_id"] != expected_ids]
    if len(mismatched):
        warnings.warn(
            f"{source}: row_id differs from StudyInstanceUID_prediction_type for {_examples(mismatched)}; "
            "keeping the given row_id",
            UserWarning,
            stacklevel=2,
        )
    return test[list(TEST_COLUMNS) + [c for c in test.columns if c not in TEST_COLUMNS]]


def check_bounding_boxes(boxes: pd.DataFrame, source: str | Path = "bounding boxes") -> pd.DataFrame:
    """Validate a train_bounding_boxes.csv-like table (already in memory).

    Args:
        boxes: ``StudyInstanceUID, x, y, width, height, slice_number``; one row per box.
        source: file name (or description) used in error messages.

    Returns:
        A copy with numeric box columns (float64) and ``slice_number`` as int64.

    Raises:
        LayoutError: missing columns, empty ids, non-numeric values, non-positive size,
            negative or fractional slice_number.
    """
    _require_columns(boxes, BOX_COLUMNS, source)
    boxes = boxes.copy()
    boxes["StudyInstanceUID"] = _check_uids(boxes, source)
    for column in ("x", "y", "width", "height", "slice_number"):
        values = pd.to_numeric(boxes[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(np.float64))
        if bad.any():
            raise LayoutError(f"column {column} must be finite numbers; bad rows {_examples(boxes.index[bad])}", source)
        boxes[column] = values.astype(np.float64)
    not_positive = (boxes["width"] <= 0) | (boxes["height"] <= 0)
    if not_positive.any():
        raise LayoutError(f"width and height must be > 0; bad rows {_examples(boxes.index[not_positive])}", source)
    slices = boxes["slice_number"]
    bad_slice = (slices < 0) | (slices != np.round(slices))
    if bad_slice.any():
        raise LayoutError(
            f"slice_number must be a non-negative integer; bad rows {_examples(boxes.index[bad_slice])}", source
        )
    boxes["slice_number"] = slices.astype(np.int64)
    return boxes


def read_train_labels(path: str | Path, *, keep_unknown: bool = False) -> pd.DataFrame:
    """Read and validate train.csv (see ``check_train_labels``).

    Args:
        path: the CSV file.
        keep_unknown: keep the studies whose fracture labels are unknown (all targets empty).
    """
    return check_train_labels(_read_csv(path, TRAIN_COLUMNS), source=Path(path), keep_unknown=keep_unknown)


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate test.csv (see ``check_test_frame``).

    Args:
        path: the CSV file.
    """
    return check_test_frame(_read_csv(path, TEST_COLUMNS), source=Path(path))


def read_bounding_boxes(path: str | Path) -> pd.DataFrame:
    """Read and validate train_bounding_boxes.csv (see ``check_bounding_boxes``).

    Args:
        path: the CSV file.
    """
    return check_bounding_boxes(_read_csv(path, BOX_COLUMNS), source=Path(path))


def test_studies(test_df: pd.DataFrame) -> list[str]:
    """Unique StudyInstanceUIDs of a test table, in order of first appearance.

    Args:
        test_df: a test.csv-like table.
    """
    return [str(uid) for uid in pd.unique(test_df["StudyInstanceUID"].astype(str))]


# pytest would otherwise try to collect this public helper as a test when a test module imports it.
test_studies.__test__ = False  # type: ignore[attr-defined]


def _has_dicom(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(entry.name.lower().endswith(".dcm") and entry.is_file() for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


def studies_without_images(layout: KaggleLayout, uids: Iterable[str], split: str) -> list[str]:
    """The studies whose image folder is missing or holds no ``.dcm`` file.

    Args:
        layout: the competition layout.
        uids: StudyInstanceUIDs to check.
        split: ``"train"`` or ``"test"``.

    Returns:
        The missing UIDs, in input order.
    """
    missing = [uid for uid in uids if not _has_dicom(layout.study_dir(uid, split))]
    if missing:
        logger.warning("%d %s studies have no DICOM files, e.g. %s", len(missing), split, missing[:3])
    return missing

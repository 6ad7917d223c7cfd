"""Sagittal training slices for the column U-Net from real labelled CT (VerSe, TotalSegmentator).

VerSe ships each CT and its vertebra mask as NIfTI on the same grid (labels 1–7 C1–C7, 8–19 T1–T12,
20–25 L1–L6, 28 T13); TotalSegmentator's examples pair a DICOM series with a multi-organ NIfTI whose
vertebrae are some of its labels (``--labels``). Either way the CT becomes a ``(z, y, x)`` array in the
project's convention, the labels are aligned with it through the affines, and
:func:`~rsna_cspine.twod.sagittal.sagittal_slices` cuts the planes that ``synth-sagittal`` would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from rsna_cspine.errors import ConfigError, LayoutError, NiftiError
from rsna_cspine.io.dicom import load_series
from rsna_cspine.io.nifti import load_segmentation
from rsna_cspine.twod.sagittal import SagittalConfig, _save_png, sagittal_slices, window_to_uint8

log = logging.getLogger(__name__)

LABEL_COLUMNS: tuple[str, ...] = ("path", "mask", "study", "slice", "offset_mm", "label")


def parse_labels(text: str | None) -> frozenset[int] | None:
    """``"1-25,28"`` → the label values that are vertebrae; None or empty → every label above 0.

    Raises:
        ConfigError: a part is not a number or a ``low-high`` range.
    """
    if not text:
        return None
    values: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            low, _, high = part.partition("-")
            values.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ConfigError(f"--labels: {part!r} is not a number or a low-high range") from None
    return frozenset(values)


def _nifti_as_zyx(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as ``(z, y, x)`` (superior→inferior, anterior→posterior, right→left) and its spacing."""
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))  # axes now point to R, A, S
        data = np.asarray(image.dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise NiftiError(f"unreadable NIfTI ({exc})", path) from exc
    if data.ndim != 3:
        raise NiftiError(f"expected a 3-D volume, got shape {data.shape}", path)
    zooms = image.header.get_zooms()[:3]
    # R→L, A→P and S→I are the reversed canonical axes; the slice axis goes first.
    return data[::-1, ::-1, ::-1].transpose(2, 1, 0), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_labelled_ct(ct: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A CT (DICOM folder or NIfTI file) and its label NIfTI as aligned ``(z, y, x)`` arrays.

    Args:
        ct: DICOM series folder, or ``.nii``/``.nii.gz`` CT in HU.
        labels: label NIfTI of the same patient.

    Returns:
        ``(hu float32, labels int32, spacing (dz, dy, dx) mm)``.

    Raises:
        DicomSeriesError / NiftiError: unreadable inputs or grids that do not match.
    """
    ct, labels = Path(ct), Path(labels)
    if ct.is_dir():
        volume = load_series(ct, workers=1)
        return volume.hu, load_segmentation(labels, volume, max_label=None).astype(np.int32), volume.spacing
    hu, spacing = _nifti_as_zyx(ct)
    label_map, label_spacing = _nifti_as_zyx(labels)
    if label_map.shape != hu.shape or not np.allclose(spacing, label_spacing, atol=1e-3):
        raise NiftiError(f"label grid {label_map.shape} @ {label_spacing} mm differs from the CT's "
                         f"{hu.shape} @ {spacing} mm (VerSe pairs share one grid)", labels)
    return hu.astype(np.float32), np.rint(label_map).astype(np.int32), spacing


def import_sagittal(
    ct: str | Path,
    labels: str | Path,
    out_dir: str | Path,
    cfg: SagittalConfig,
    vertebra_labels: frozenset[int] | None = None,
    study: str | None = None,
    label: str = "",
) -> pd.DataFrame:
    """Cut one labelled CT into sagittal images and column masks and add them to ``out_dir/labels.csv``.

    Args:
        ct: DICOM series folder or CT NIfTI.
        labels: its label NIfTI.
        out_dir: the dataset folder (``images/``, ``masks/`` and ``labels.csv`` as ``synth-sagittal`` writes).
        cfg: planes, field and image size.
        vertebra_labels: label values that are vertebrae; None: every label above 0 (VerSe).
        study: the study's name (default: the CT's name without suffixes).
        label: the study's class, if known (empty for segmentation-only data).

    Returns:
        The rows added.

    Raises:
        LayoutError: the study is already in ``labels.csv``, or no vertebra label is present.
    """
    hu, label_map, spacing = load_labelled_ct(ct, labels)
    column = label_map > 0 if vertebra_labels is None else np.isin(label_map, sorted(vertebra_labels))
    name = study or Path(ct).name.split(".")[0]
    out_dir = Path(out_dir)
    table_path = out_dir / "labels.csv"
    existing = pd.read_csv(table_path, dtype=str, keep_default_na=False) if table_path.is_file() else None
    if existing is not None and (existing.get("study") == name).any():
        raise LayoutError(f"study {name!r} is already in this dataset", table_path)
    stack = sagittal_slices(hu, column, spacing, cfg)
    rows = []
    for i, offset in enumerate(stack.offsets_mm):
        image_path = Path("images") / name / f"{name}_s{i:02d}.png"
        mask_path = Path("masks") / name / f"{name}_s{i:02d}.png"
        _save_png(window_to_uint8(stack.images[i], cfg.window), out_dir / image_path)
        _save_png(stack.masks[i].astype(np.uint8) * 255, out_dir / mask_path)
        rows.append({"path": image_path.as_posix(), "mask": mask_path.as_posix(), "study": name, "slice": i,
                     "offset_mm": round(float(offset), 3), "label": label})
    added = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    table = added if existing is None else pd.concat([existing, added.astype(str)], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    log.info("%s: %d sagittal images (%d column pixels) added to %s", name, len(added), int(stack.masks.sum()),
             table_path)
    return added

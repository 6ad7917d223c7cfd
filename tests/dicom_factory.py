"""Tiny CT DICOM series factory for the loader tests (and the loader benchmark).

Builds real DICOM files with pydicom: stored pixel values, geometry, per-slice rescale and pixel
representation are chosen by the caller, so every expectation in a test follows from its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

AXIAL_ORIENTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_ct_slice(
    stored: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL_ORIENTATION,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int | None = None,
    series_uid: str = "1.2.3.4.1",
    study_uid: str = "1.2.3.4",
    instance_number: int = 1,
) -> Dataset:
    """One uncompressed CT slice whose stored values are exactly ``stored``.

    Args:
        stored: 2-D int16 (PixelRepresentation 1) or uint16 (PixelRepresentation 0) array.
        position: ImagePositionPatient (LPS mm).
        orientation: ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: (row spacing, column spacing) in mm.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        bits_stored: BitsStored; defaults to 16.
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        instance_number: InstanceNumber.
    """
    if stored.dtype not in (np.int16, np.uint16):
        raise TypeError(f"stored must be int16 or uint16, got {stored.dtype}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.set_pixel_data(
        np.ascontiguousarray(stored),
        photometric_interpretation="MONOCHROME2",
        bits_stored=16 if bits_stored is None else bits_stored,
        generate_instance_uid=False,
    )
    return ds


def compress_jpeg_lossless(path: Path) -> None:
    """Re-encode the file at ``path`` in place as JPEG Lossless SV1 (.4.70) with GDCM.

    pydicom has no JPEG Lossless encoder; GDCM has, and the RSNA studies use this syntax.

    Args:
        path: an uncompressed DICOM file.
    """
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise OSError(f"GDCM cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"GDCM cannot JPEG-Lossless encode {path}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"GDCM cannot write {path}")


def save_slice(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` to ``path``, compressed with ``transfer_syntax`` when it is not uncompressed.

    Args:
        ds: a dataset from :func:`make_ct_slice`.
        path: destination file.
        transfer_syntax: ExplicitVRLittleEndian, JPEGLosslessSV1, or any syntax pydicom can encode
            (RLE Lossless, JPEG 2000 Lossless, ...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax == JPEGLosslessSV1:
        ds.save_as(path, enforce_file_format=True)
        compress_jpeg_lossless(path)
        return path
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def axial_positions(
    n: int, *, dz: float = 1.0, top: float = 0.0, origin_xy: tuple[float, float] = (-10.0, -20.0)
) -> np.ndarray:
    """``(n, 3)`` LPS positions of an axial stack from superior (``top``) downwards every ``dz`` mm.

    Args:
        n: number of slices.
        dz: slice step in mm.
        top: patient z (LPS, mm) of the most superior slice.
        origin_xy: (x, y) of every slice's first pixel.
    """
    z = top - dz * np.arange(n, dtype=float)
    return np.column_stack([np.full(n, origin_xy[0]), np.full(n, origin_xy[1]), z])


def write_series(
    folder: Path,
    stored: np.ndarray,
    positions: np.ndarray,
    *,
    names: Sequence[str] | None = None,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str = "1.2.3.4.1",
    study_uid: str = "1.2.3.4",
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    orientation: Sequence[float] = AXIAL_ORIENTATION,
) -> list[Path]:
    """Write ``stored[i]`` at ``positions[i]`` as file ``names[i]`` (default ``f"{i + 1}.dcm"``).

    Args:
        folder: output folder (created).
        stored: ``(n, rows, cols)`` int16/uint16 stored values.
        positions: ``(n, 3)`` ImagePositionPatient per slice.
        names: file name per slice.
        slopes: RescaleSlope per slice (default 1).
        intercepts: RescaleIntercept per slice (default -1024).
        transfer_syntax: see :func:`save_slice`.
        series_uid: SeriesInstanceUID of every slice.
        study_uid: StudyInstanceUID of every slice.
        pixel_spacing: PixelSpacing of every slice.
        orientation: ImageOrientationPatient of every slice.
    """
    n = len(stored)
    names = [f"{i + 1}.dcm" for i in range(n)] if names is None else list(names)
    slopes = [1.0] * n if slopes is None else list(slopes)
    intercepts = [-1024.0] * n if intercepts is None else list(intercepts)
    paths = []
    for i in range(n):
        ds = make_ct_slice(
            stored[i],
            position=positions[i],
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            slope=slopes[i],
            intercept=intercepts[i],
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=i + 1,
        )
        paths.append(save_slice(ds, Path(folder) / names[i], transfer_syntax))
    return paths


def random_stored(n: int, rows: int, cols: int, *, signed: bool = True, seed: int = 0) -> np.ndarray:
    """Random CT-like stored values: int16 in [-1000, 2000] or uint16 in [0, 3000].

    Args:
        n: number of slices.
        rows: image rows.
        cols: image columns.
        signed: int16 (PixelRepresentation 1) when True, else uint16.
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    if signed:
        return rng.integers(-1000, 2000, size=(n, rows, cols)).astype(np.int16)
    return rng.integers(0, 3000, size=(n, rows, cols)).astype(np.uint16)

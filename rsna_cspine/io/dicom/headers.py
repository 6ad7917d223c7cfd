"""One file's header → :class:`SliceHeader`, parsed once with pixel data deferred.

pydicom records where the pixel bytes start and skips them; the decoder later reads them at that offset.
The pass over a whole folder (worker processes, multi-frame files split into frames) is ``scan.py``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rsna_cspine.errors import DicomSeriesError

#: Elements larger than this are not read in the header pass (the pixel data, vendor blobs).
_DEFER_BYTES = 4096
#: Larger |ImagePositionPatient| coordinates (mm) are corrupt values, not a patient position.
_MAX_COORDINATE_MM = 1e5
#: Larger Rows × Columns is a corrupt header (8192² is far above any CT matrix).
_MAX_PIXELS = 8192 * 8192
#: How far from 1 the length of an orientation cosine may be (rounded values in real headers).
_UNIT_TOLERANCE = 1e-2
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Transfer syntaxes whose pixel bytes lie in the file as stored (no byte swapping, no inflating).
NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SliceHeader:
    """What the loader needs from one file's header.

    Attributes:
        path: the file.
        series_uid: SeriesInstanceUID ("" when absent).
        study_uid: StudyInstanceUID ("" when absent).
        position: ImagePositionPatient (LPS mm), None when absent or malformed.
        orientation: ImageOrientationPatient (row cosine, column cosine), None when absent or malformed.
        pixel_spacing: PixelSpacing (row step, column step) in mm, None when absent.
        matrix: (Rows, Columns), None when absent.
        slope: RescaleSlope (1 when absent).
        intercept: RescaleIntercept (0 when absent).
        transfer_syntax: TransferSyntaxUID.
        has_pixel_data: whether the file has a Pixel Data element.
        instance_number: InstanceNumber, None when absent.
        slice_gap_hint: SpacingBetweenSlices, else SliceThickness (mm), None when both are absent;
            only used for a one-slice series.
        notes: warnings pydicom raised while reading the header.
        pixel_offset: file offset of the Pixel Data value, None when only a full parse reaches the
            pixels (deflated or big-endian files, an unreadable Image Pixel module).
        pixel_format: the Image Pixel module as pydicom's decoding options (``rows``,
            ``bits_allocated``, ``pixel_representation``, ...; see ``as_pixel_options``).
        frame: index of this slice's frame in a multi-frame file (Enhanced CT), None for a
            single-frame file.
    """

    path: Path
    series_uid: str
    study_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    matrix: tuple[int, int] | None
    slope: float
    intercept: float
    transfer_syntax: str
    has_pixel_data: bool
    instance_number: int | None = None
    slice_gap_hint: float | None = None
    notes: tuple[str, ...] = ()
    pixel_offset: int | None = None
    pixel_format: dict[str, Any] = field(default_factory=dict)
    frame: int | None = None

    @property
    def name(self) -> str:
        """How messages name the slice: the file name, with the frame number for a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"

    @property
    def number(self) -> int:
        """The slice's number: the file name's (``12`` for ``12.dcm``, -1 if none), or the 1-based frame number."""
        return slice_number(self.path) if self.frame is None else self.frame + 1

    @property
    def is_compressed(self) -> bool:
        return UID(self.transfer_syntax).is_compressed

    @property
    def missing_geometry(self) -> str | None:
        """Why this slice cannot be placed in a volume, or None when it can."""
        if not self.has_pixel_data:
            return "no pixel data"
        if self.position is None:
            return "no valid ImagePositionPatient" + (" in its Plane Position functional group" if self.frame is not None else "")
        if self.orientation is None:
            return "no valid ImageOrientationPatient"
        if self.matrix is None:
            return "no Rows/Columns"
        return None


def read_slice_header(path: str | Path) -> SliceHeader:
    """Parse one file's header (pixel data deferred, not read).

    A multi-frame file gives its file-level header here; ``scan.read_file_headers`` gives one header per frame.

    Args:
        path: a DICOM file.

    Raises:
        DicomSeriesError: the file is not DICOM or cannot be parsed.
    """
    return read_header_and_dataset(Path(path))[0]


def read_header_and_dataset(path: Path) -> tuple[SliceHeader, Dataset]:
    """The file-level header and the parsed dataset (pixel data deferred)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except InvalidDicomError as exc:
            raise DicomSeriesError(f"not a DICOM file ({exc})", path) from exc
        except Exception as exc:  # pydicom raises many types on truncated or corrupt files
            raise DicomSeriesError(f"unreadable DICOM header ({type(exc).__name__}: {exc})", path) from exc
        try:
            header = _header_from_dataset(path, ds)
        except DicomSeriesError:
            raise
        except Exception as exc:
            raise DicomSeriesError(f"malformed DICOM header ({type(exc).__name__}: {exc})", path) from exc
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    return (replace(header, notes=notes) if notes else header), ds


def natural_key(path: Path) -> tuple[bool, int, str]:
    """Sort key of a folder's files: numbered names (``2.dcm`` before ``10.dcm``) first, then by name."""
    number = slice_number(path)
    return (number < 0, number, path.name)


def slice_number(path: Path) -> int:
    """``12`` for ``12.dcm`` or ``12``; -1 when the name (without ``.dcm``) is not an integer."""
    stem = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
    return int(stem) if stem.isdigit() else -1


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _floats(value: object, n: int) -> list[float] | None:
    """``n`` finite numbers from a multi-valued element, else None (plain floats: numpy is slow on 3 values)."""
    try:
        out = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None



def _header_from_dataset(path: Path, ds: Dataset) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise DicomSeriesError(f"unknown transfer syntax {transfer_syntax!r}", path)
    orientation = valid_orientation(ds.get("ImageOrientationPatient"))
    position = valid_position(ds.get("ImagePositionPatient"))
    spacing = valid_spacing(ds.get("PixelSpacing"))
    rows, columns = ds.get("Rows"), ds.get("Columns")
    instance = ds.get("InstanceNumber")
    slope, intercept = valid_rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), path)
    has_pixel_data = "PixelData" in ds
    pixel_offset, pixel_format = None, {}
    if has_pixel_data:
        # keep_deferred: the element's length and file offset, without reading the pixel bytes.
        element = ds.get_item("PixelData", keep_deferred=True)
        _check_pixel_format(ds, path, syntax.is_compressed, getattr(element, "length", None))
        pixel_format = _pixel_format(ds)
        # Offsets are file positions only where the dataset is stored as is (not deflated) and in
        # little-endian order, the only order the fast readers below handle.
        readable_at_offset = syntax in NATIVE_LITTLE_ENDIAN or (syntax.is_encapsulated and not syntax.is_deflated)
        if isinstance(element, RawDataElement) and readable_at_offset and pixel_format:
            pixel_offset = int(element.value_tell)
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        matrix=(int(rows), int(columns)) if rows and columns else None,
        slope=slope,
        intercept=intercept,
        transfer_syntax=transfer_syntax,
        has_pixel_data=has_pixel_data,
        instance_number=int(instance) if isinstance(instance, int) else None,
        slice_gap_hint=_positive_float(ds.get("SpacingBetweenSlices")) or _positive_float(ds.get("SliceThickness")),
        pixel_offset=pixel_offset,
        pixel_format=pixel_format,
    )


def valid_orientation(value: object) -> np.ndarray | None:
    """ImageOrientationPatient as 6 floats: two unit, orthogonal cosines; None when absent or malformed."""
    orientation = _floats(value, 6)
    if orientation is None:
        return None
    row, col = orientation[:3], orientation[3:]
    unit = abs(math.hypot(*row) - 1) <= _UNIT_TOLERANCE and abs(math.hypot(*col) - 1) <= _UNIT_TOLERANCE
    return np.array(orientation) if unit and abs(sum(r * c for r, c in zip(row, col))) < 1e-2 else None


def valid_position(value: object) -> np.ndarray | None:
    """ImagePositionPatient as 3 finite, plausible floats (LPS mm); None when absent or malformed."""
    position = _floats(value, 3)
    return None if position is None or max(abs(v) for v in position) > _MAX_COORDINATE_MM else np.array(position)


def valid_spacing(value: object) -> tuple[float, float] | None:
    """PixelSpacing as two positive floats; None when absent or malformed."""
    spacing = _floats(value, 2)
    return None if spacing is None or min(spacing) <= 0 else (spacing[0], spacing[1])


def valid_rescale(slope_value: object, intercept_value: object, path: Path) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent or empty, not when 0).

    Raises:
        DicomSeriesError: values that cannot give finite HU in float32.
    """
    slope = 1.0 if slope_value is None or slope_value == "" else float(slope_value)  # type: ignore[arg-type]
    intercept = 0.0 if intercept_value is None or intercept_value == "" else float(intercept_value)  # type: ignore[arg-type]
    # Stored values have at most 32 bits: this bound keeps every HU finite in float32.
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0
            and abs(slope) * 2.0**32 + abs(intercept) < _FLOAT32_MAX):
        raise DicomSeriesError(f"RescaleSlope {slope} / RescaleIntercept {intercept} cannot give finite HU", path)
    return slope, intercept


def _check_pixel_format(ds: Dataset, path: Path, compressed: bool, length: int | None) -> None:
    """Refuse pixel layouts a CT slice never has before any decoder sees them."""
    bits = ds.get("BitsAllocated")
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    allowed_bits = (8, 16) if compressed else (8, 16, 32)
    if bits not in allowed_bits or samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomSeriesError(
            f"not a grey-level image: BitsAllocated {bits}, SamplesPerPixel {samples}, {photometric}", path
        )
    rows, columns = ds.get("Rows") or 0, ds.get("Columns") or 0
    if rows * columns > _MAX_PIXELS:
        raise DicomSeriesError(f"implausible matrix {rows}x{columns}", path)
    if not compressed and length is not None and length != 0xFFFFFFFF and length < rows * columns * bits // 8:
        raise DicomSeriesError(f"{length} bytes of pixel data for a {rows}x{columns} {bits}-bit image", path)


def _pixel_format(ds: Dataset) -> dict[str, Any]:
    """pydicom's decoding options for ``ds`` as plain values; {} when its Image Pixel module is unreadable.

    Plain ints and strings so that headers pickle cheaply between processes; an unreadable module
    leaves the slice to the full-parse path, which reports the error the way pydicom words it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same values are read (and warned about) in the header
            options = as_pixel_options(ds)
        return {key: int(value) if isinstance(value, int) else str(value) if isinstance(value, str) else value
                for key, value in options.items()}
    except Exception:  # noqa: BLE001 - malformed values of any kind: decided in the pixel pass
        return {}

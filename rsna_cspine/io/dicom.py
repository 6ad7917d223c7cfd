"""One folder of axial CT DICOM files → a :class:`~rsna_cspine.io.volume.Volume` in Hounsfield units.

Two passes. The header pass parses every file once with the pixel data deferred (pydicom reads the
tags and only records where the pixel bytes are), picks the series, drops what cannot be placed and
sorts the slices along the slice normal, superior first. The pixel pass decodes each slice straight
into a preallocated float32 array: in this process for uncompressed data, in a pool of worker
processes for compressed data, because the JPEG / JPEG 2000 decoders (pylibjpeg, GDCM) hold the GIL
so threads do not run them in parallel.

Every repair (skipped file, dropped slice, gap, decoder fallback, ...) is written to
``Volume.warnings`` and logged; anything that would leave a wrong volume raises
:class:`~rsna_cspine.errors.DicomSeriesError` naming the folder or file and the cause.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import struct
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.volume import Volume

logger = logging.getLogger(__name__)

#: pydicom decoding plugins in the order they are tried; a plugin that raises hands over to the next
#: one and the switch is recorded. Plugins pydicom has for a syntax but not listed here come last.
#: The order is the faster first, measured on 512² CT slices on one core: JPEG 2000 pylibjpeg
#: (OpenJPEG) 57 ms vs GDCM 66 ms; JPEG Lossless GDCM 11 ms vs pylibjpeg (libjpeg) 21 ms. For
#: JPEG Lossless this is also pydicom's own default order, so values match ``ds.pixel_array``.
DECODING_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEG2000Lossless: ("pylibjpeg", "gdcm"),
    JPEG2000: ("pylibjpeg", "gdcm"),
}
#: Order for every syntax not in :data:`DECODING_PLUGINS` (JPEG Lossless, JPEG-LS, RLE, ...).
DEFAULT_DECODING_PLUGINS: tuple[str, ...] = ("gdcm", "pylibjpeg")

#: Elements larger than this are not read in the header pass (the pixel data, vendor blobs).
_DEFER_BYTES = 4096
#: Positions closer than this along the slice normal are the same slice (mm).
_DUPLICATE_TOLERANCE_MM = 0.01
#: A step longer than this many times the median step is a gap (missing slices).
_GAP_FACTOR = 1.5
#: Angle between the slice normal and the slice-to-slice step above which a series counts as tilted.
_TILT_TOLERANCE_DEG = 0.1
#: Fewer compressed slices than this are decoded in-process: a pool would cost more than it saves.
_MIN_SLICES_FOR_POOL = 8
#: At most this many file names are quoted in one message.
_MAX_NAMED = 5
#: Larger |ImagePositionPatient| coordinates (mm) are corrupt values, not a patient position.
_MAX_COORDINATE_MM = 1e5
#: Larger Rows × Columns is a corrupt header (8192² is far above any CT matrix).
_MAX_PIXELS = 8192 * 8192
#: Syntaxes whose codestream ends with an end-of-image marker (JPEG EOI / JPEG 2000 EOC, both FFD9)
#: and states its own image size; both are checked before any decoder sees the frame, because
#: GDCM aborts the process and libjpeg loops forever on some inconsistent streams.
_JPEG_FAMILY = frozenset({
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000,
})
#: JPEG SOF0..SOF15 (not DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})

_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Header values every slice of a volume must share; the minority is dropped (or the series refused).
_MUST_AGREE: tuple[tuple[str, Callable[[SliceHeader], object]], ...] = (
    ("matrix size", lambda h: h.matrix),
    ("orientation", lambda h: tuple(np.round(h.orientation, 3).tolist())),  # type: ignore[arg-type]
    ("pixel spacing", lambda h: h.pixel_spacing),
)

#: One decoded slice: (stored values or None, note naming a fallback decoder, error or None).
_Decoded = tuple[np.ndarray | None, str | None, str | None]


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

    @property
    def is_compressed(self) -> bool:
        return pydicom.uid.UID(self.transfer_syntax).is_compressed

    @property
    def missing_geometry(self) -> str | None:
        """Why this slice cannot be placed in a volume, or None when it can."""
        if not self.has_pixel_data:
            return "no pixel data"
        if self.position is None:
            return "no valid ImagePositionPatient"
        if self.orientation is None:
            return "no valid ImageOrientationPatient"
        if self.matrix is None:
            return "no Rows/Columns"
        return None


@dataclass
class _Report:
    """Collects the repairs made while loading one series and logs each one."""

    folder: Path
    messages: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.messages.append(message)
        logger.warning("%s: %s", self.folder, message)


def read_slice_header(path: str | Path) -> SliceHeader:
    """Parse one file's header (pixel data deferred, not read).

    Args:
        path: a DICOM file.

    Raises:
        DicomSeriesError: the file is not DICOM or cannot be parsed.
    """
    return _read_header(Path(path))[0]


def read_slice_hu(path: str | Path, *, plugins: Sequence[str] | None = None) -> np.ndarray:
    """Decode one file to a float32 ``(rows, columns)`` array in HU (stored value × slope + intercept).

    Args:
        path: a single-frame DICOM file.
        plugins: pydicom decoding plugins to try first, in order ("pylibjpeg", "gdcm", ...); None
            → :data:`DECODING_PLUGINS` for the file's transfer syntax.

    Raises:
        DicomSeriesError: the file is not DICOM, has no pixel data or cannot be decoded.
    """
    header, dataset = _read_header(Path(path))
    stored, _ = _decode_dataset(dataset, None if plugins is None else tuple(plugins))
    out = np.empty(stored.shape, dtype=np.float32)
    _rescale_into(stored, header.slope, header.intercept, out)
    return out


def load_series(
    folder: str | Path,
    *,
    workers: int | None = None,
    min_valid_fraction: float = 0.9,
) -> Volume:
    """Load a folder of CT slices as a HU volume ordered superior → inferior.

    Args:
        folder: folder holding the slices (any file names; non-DICOM files are skipped).
        workers: processes decoding compressed slices; None → min(available CPUs, 4); 1 → no pool.
        min_valid_fraction: smallest fraction of the series' files that must load; below it the
            series is refused rather than returned with holes.

    Returns:
        The volume; ``Volume.warnings`` lists every repair made.

    Raises:
        DicomSeriesError: missing or empty folder, no usable DICOM pixel data, or too many bad files.
    """
    folder = Path(folder)
    if not 0.0 < min_valid_fraction <= 1.0:
        raise ValueError(f"min_valid_fraction must be in (0, 1], got {min_valid_fraction}")
    if not folder.exists():
        raise DicomSeriesError("folder does not exist", folder)
    if not folder.is_dir():
        raise DicomSeriesError("not a folder", folder)
    paths = sorted((p for p in folder.iterdir() if p.is_file()), key=_natural_key)
    if not paths:
        raise DicomSeriesError("folder is empty", folder)

    report = _Report(folder)
    headers, datasets, bad = _read_headers(paths, report)
    headers, more_bad = _choose_series(headers, folder, report)
    bad += more_bad
    headers, more_bad = _drop_unplaceable(headers)
    bad += more_bad
    for what, key in _MUST_AGREE:
        headers, more_bad = _keep_majority(headers, what, key, report)
        bad += more_bad
    n_expected = len(headers) + len(bad)
    _check_valid_fraction(folder, n_expected, bad, min_valid_fraction)

    headers, normal = _sort_superior_first(headers, report)
    headers = _drop_duplicates(headers, normal, report)

    try:
        hu = np.empty((len(headers), *headers[0].matrix), dtype=np.float32)
    except MemoryError as exc:
        raise DicomSeriesError(f"cannot allocate a {len(headers)}x{headers[0].matrix} float32 volume", folder) from exc
    failed = _decode_into(hu, headers, datasets, _resolve_workers(workers), report)
    if failed:
        bad += [(headers[i].path, reason) for i, reason in failed.items()]
        _check_valid_fraction(folder, n_expected, bad, min_valid_fraction)
        keep = [i for i in range(len(headers)) if i not in failed]
        hu = hu[keep]
        headers = [headers[i] for i in keep]
    if bad:
        report.warn(f"skipped {len(bad)} slice file(s): {_names([f'{p.name} ({why})' for p, why in bad])}")
    return _assemble(hu, headers, normal, folder, report)


# --------------------------------------------------------------------------- header pass


def _natural_key(path: Path) -> tuple[bool, int, str]:
    number = _slice_number(path)
    return (number < 0, number, path.name)


def _slice_number(path: Path) -> int:
    """``12`` for ``12.dcm`` or ``12``; -1 when the name (without ``.dcm``) is not an integer."""
    stem = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
    return int(stem) if stem.isdigit() else -1


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _read_header(path: Path) -> tuple[SliceHeader, Dataset]:
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


def _header_from_dataset(path: Path, ds: Dataset) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
    if not pydicom.uid.UID(transfer_syntax).is_transfer_syntax:
        raise DicomSeriesError(f"unknown transfer syntax {transfer_syntax!r}", path)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        unit = np.isclose(np.linalg.norm(row), 1, atol=1e-2) and np.isclose(np.linalg.norm(col), 1, atol=1e-2)
        if not (unit and abs(row @ col) < 1e-2):
            orientation = None
    position = _floats(ds.get("ImagePositionPatient"), 3)
    if position is not None and np.abs(position).max() > _MAX_COORDINATE_MM:
        position = None
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if spacing is not None and np.any(spacing <= 0):
        spacing = None
    rows, columns = ds.get("Rows"), ds.get("Columns")
    instance = ds.get("InstanceNumber")
    slope = _rescale_value(ds.get("RescaleSlope"), 1.0)
    intercept = _rescale_value(ds.get("RescaleIntercept"), 0.0)
    # Stored values have at most 32 bits: this bound keeps every HU finite in float32.
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0
            and abs(slope) * 2.0**32 + abs(intercept) < np.finfo(np.float32).max):
        raise DicomSeriesError(f"RescaleSlope {slope} / RescaleIntercept {intercept} cannot give finite HU", path)
    if "PixelData" in ds:
        _check_pixel_format(ds, path, pydicom.uid.UID(transfer_syntax).is_compressed)
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        position=position,
        orientation=orientation,
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        matrix=(int(rows), int(columns)) if rows and columns else None,
        slope=slope,
        intercept=intercept,
        transfer_syntax=transfer_syntax,
        has_pixel_data="PixelData" in ds,
        instance_number=int(instance) if isinstance(instance, int) else None,
        slice_gap_hint=_positive_float(ds.get("SpacingBetweenSlices")) or _positive_float(ds.get("SliceThickness")),
    )


def _rescale_value(value: object, default: float) -> float:
    """RescaleSlope/Intercept as a float; ``default`` when absent or empty (not when 0)."""
    return default if value is None or value == "" else float(value)  # type: ignore[arg-type]


def _check_pixel_format(ds: Dataset, path: Path, compressed: bool) -> None:
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
    element = ds.get_item("PixelData")
    length = getattr(element, "length", None)
    if not compressed and length is not None and length != 0xFFFFFFFF and length < rows * columns * bits // 8:
        raise DicomSeriesError(f"{length} bytes of pixel data for a {rows}x{columns} {bits}-bit image", path)


def _read_headers(
    paths: list[Path], report: _Report
) -> tuple[list[SliceHeader], dict[Path, Dataset], list[tuple[Path, str]]]:
    headers: list[SliceHeader] = []
    datasets: dict[Path, Dataset] = {}
    bad: list[tuple[Path, str]] = []
    not_dicom: list[str] = []
    pydicom_notes: Counter[str] = Counter()
    for path in paths:
        try:
            header, ds = _read_header(path)
        except DicomSeriesError as exc:
            if exc.reason.startswith("not a DICOM file"):
                not_dicom.append(path.name)
            else:
                bad.append((path, exc.reason))
            continue
        headers.append(header)
        datasets[path] = ds
        pydicom_notes.update(header.notes)
    if not_dicom:
        report.warn(f"skipped {len(not_dicom)} non-DICOM file(s): {_names(not_dicom)}")
    for note, count in list(pydicom_notes.items())[:_MAX_NAMED]:
        report.warn(f"pydicom ({count} file(s)): {note}")
    if len(pydicom_notes) > _MAX_NAMED:
        report.warn(f"pydicom: {len(pydicom_notes) - _MAX_NAMED} more distinct header warning(s) not shown")
    if not headers:
        detail = f"; unreadable: {_names([f'{p.name} ({r})' for p, r in bad])}" if bad else ""
        raise DicomSeriesError(f"no readable DICOM file among {len(paths)} file(s){detail}", report.folder)
    return headers, datasets, bad


def _choose_series(
    headers: list[SliceHeader], folder: Path, report: _Report
) -> tuple[list[SliceHeader], list[tuple[Path, str]]]:
    """The headers of the series with the most slices, and the files that are probably broken."""
    with_pixels = Counter(h.series_uid for h in headers if h.has_pixel_data)
    if not with_pixels:
        raise DicomSeriesError(f"no pixel data in any of {len(headers)} DICOM file(s)", folder)
    # Most slices wins; the UID breaks ties so the choice does not depend on file order.
    chosen = max(with_pixels, key=lambda uid: (with_pixels[uid], uid))
    # A file without a SeriesInstanceUID beside a series that has one is a damaged member (a cut
    # header reads as a short dataset), not another series.
    broken = [(h.path, "no SeriesInstanceUID") for h in headers if chosen and not h.series_uid]
    others: dict[str, list[str]] = {}
    for h in headers:
        if h.series_uid and h.series_uid != chosen:
            others.setdefault(h.series_uid, []).append(h.path.name)
    if others:
        listed = "; ".join(f"{uid} ({len(names)} files: {_names(names)})" for uid, names in others.items())
        kept = f"{chosen or '<no SeriesInstanceUID>'} ({with_pixels[chosen]} slices)"
        report.warn(f"folder mixes series: kept {kept}, ignored {listed}")
    return [h for h in headers if h.series_uid == chosen], broken


def _drop_unplaceable(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[Path, str]]]:
    kept = [h for h in headers if h.missing_geometry is None]
    bad = [(h.path, h.missing_geometry) for h in headers if h.missing_geometry is not None]
    return kept, bad  # type: ignore[return-value]


def _keep_majority(
    headers: list[SliceHeader], what: str, key: Callable[[SliceHeader], object], report: _Report
) -> tuple[list[SliceHeader], list[tuple[Path, str]]]:
    """Keep the slices sharing the most common ``key``; the others are bad slices."""
    if not headers:
        return headers, []
    counts = Counter(key(h) for h in headers)
    if len(counts) == 1:
        return headers, []
    majority = max(counts, key=lambda k: (counts[k], str(k)))
    kept = [h for h in headers if key(h) == majority]
    bad = [(h.path, f"{what} {key(h)} differs from the series' {majority}") for h in headers if key(h) != majority]
    report.warn(f"mixed {what}: kept {len(kept)} slices with {majority}, dropping {len(bad)}")
    return kept, bad


def _check_valid_fraction(
    folder: Path, n_expected: int, bad: list[tuple[Path, str]], min_valid_fraction: float
) -> None:
    n_good = n_expected - len(bad)
    if n_expected == 0 or n_good <= 0 or n_good / n_expected < min_valid_fraction:
        first = _names([f"{p.name} ({reason})" for p, reason in bad])
        usable = f"only {max(n_good, 0)} of {n_expected} slice file(s) usable (need {min_valid_fraction:.0%})"
        raise DicomSeriesError(f"{usable}; bad: {first}", folder)


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f", ... ({len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def _sort_superior_first(headers: list[SliceHeader], report: _Report) -> tuple[list[SliceHeader], np.ndarray]:
    orientation = headers[0].orientation
    assert orientation is not None
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    if abs(normal[2]) < 0.5:
        report.warn(f"slice normal {np.round(normal, 3).tolist()} is not axial; ordering along it")
    # Patient z grows towards the head in LPS: the slice furthest along +z (projected) comes first.
    sense = 1.0 if normal[2] >= 0 else -1.0
    height = np.array([h.position @ normal for h in headers]) * sense  # type: ignore[operator]
    order = np.argsort(-height, kind="stable")
    return [headers[i] for i in order], normal * sense


def _drop_duplicates(headers: list[SliceHeader], normal: np.ndarray, report: _Report) -> list[SliceHeader]:
    """Keep the first slice (in file-name order) at each position along the normal."""
    kept = [headers[0]]
    dropped = []
    for header in headers[1:]:
        if abs((kept[-1].position - header.position) @ normal) < _DUPLICATE_TOLERANCE_MM:  # type: ignore[operator]
            dropped.append(f"{header.path.name} (kept {kept[-1].path.name})")
        else:
            kept.append(header)
    if dropped:
        report.warn(f"dropped {len(dropped)} slice(s) at duplicate positions: {_names(dropped)}")
    return kept


# --------------------------------------------------------------------------- pixel pass


def _resolve_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        requested = workers
    else:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = min(available, 4)
    # A daemonic process (e.g. a torch DataLoader worker) may not start children.
    return 1 if multiprocessing.current_process().daemon else requested


def _decode_into(
    hu: np.ndarray,
    headers: list[SliceHeader],
    datasets: dict[Path, Dataset],
    workers: int,
    report: _Report,
) -> dict[int, str]:
    """Fill ``hu[i]`` from ``headers[i]``; return {index: reason} of the slices that failed."""
    compressed = sum(h.is_compressed for h in headers)
    if workers > 1 and compressed >= _MIN_SLICES_FOR_POOL:
        try:
            return _fill(hu, headers, _decode_in_pool(headers, workers), report)
        except BrokenProcessPool as exc:
            report.warn(f"decoder pool failed ({exc}); decoding in-process instead")
    # pop: each dataset's pixel bytes are read on first access and freed right after decoding.
    results = (_decode_dataset_safely(datasets.pop(h.path)) for h in headers)
    return _fill(hu, headers, results, report)


def _fill(
    hu: np.ndarray,
    headers: list[SliceHeader],
    results: Iterator[_Decoded],
    report: _Report,
) -> dict[int, str]:
    failed: dict[int, str] = {}
    fallbacks: list[str] = []
    for index, (header, (stored, fallback, error)) in enumerate(zip(headers, results, strict=True)):
        if error is None and stored is not None and stored.shape != hu.shape[1:]:
            error = f"decoded shape {stored.shape} differs from the header's {hu.shape[1:]}"
        if error is not None or stored is None:
            failed[index] = error or "no pixels decoded"
            continue
        if fallback:
            fallbacks.append(f"{header.path.name} ({fallback})")
        _rescale_into(stored, header.slope, header.intercept, hu[index])
    if fallbacks:
        report.warn(f"decoder fallback used for {len(fallbacks)} slice(s): {_names(fallbacks)}")
    return failed


def _rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """``out = stored * slope + intercept`` in float32 without a float64 temporary."""
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
    else:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
        out += np.float32(intercept)


def _decode_in_pool(headers: list[SliceHeader], workers: int) -> Iterator[_Decoded]:
    """Decode in worker processes, yielding results in slice order.

    On Linux the workers are forked: they start in milliseconds and, unlike spawn/forkserver, do
    not re-import the caller's ``__main__`` (a script without a main guard still works). The
    workers only run pydicom and the codecs, so threads of the parent (torch) do not matter.
    """
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # One slice per task: a compressed slice takes 10-50 ms to decode against ~0.2 ms of messaging,
    # and bigger chunks leave one worker idle at the end of the study.
    with ProcessPoolExecutor(max_workers=min(workers, len(headers)), mp_context=context) as pool:
        yield from pool.map(_decode_file, [str(h.path) for h in headers])


def _decode_file(path: str) -> _Decoded:
    """Worker entry point: (stored values, fallback note, error); never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header notes were already collected by the parent
            ds = pydicom.dcmread(path)
    except Exception as exc:
        return None, None, f"unreadable ({type(exc).__name__}: {exc})"
    return _decode_dataset_safely(ds)


def _decode_dataset_safely(ds: Dataset) -> _Decoded:
    try:
        stored, fallback = _decode_dataset(ds, None)
    except Exception as exc:
        return None, None, str(exc.reason if isinstance(exc, DicomSeriesError) else f"{type(exc).__name__}: {exc}")
    return stored, fallback, None


def _decode_dataset(ds: Dataset, plugins: tuple[str, ...] | None) -> tuple[np.ndarray, str | None]:
    """Stored pixel values of a single-frame dataset and a note when a fallback decoder was needed."""
    if "PixelData" not in ds:
        raise DicomSeriesError("no pixel data", ds.filename)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomSeriesError(f"multi-frame file ({frames} frames) is not an axial slice", ds.filename)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = _plain_native(ds, transfer_syntax)
        if native is not None:
            return native, None
        decoder = get_decoder(transfer_syntax)
        if not transfer_syntax.is_compressed:  # pydicom's own native decoder, no plugins involved
            return _single_channel(decoder.as_array(ds)[0], ds), None
        if transfer_syntax in _JPEG_FAMILY:
            _check_codestream(ds)
        available = list(decoder.available_plugins)
        if not available:
            raise DicomSeriesError(f"no installed decoder for {transfer_syntax.name}", ds.filename)
        if plugins is None:
            plugins = DECODING_PLUGINS.get(transfer_syntax, DEFAULT_DECODING_PLUGINS)
        order = [p for p in plugins if p in available] + [p for p in available if p not in plugins]
        failures: list[str] = []
        for plugin in order:
            try:
                stored, _ = decoder.as_array(ds, decoding_plugin=plugin)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - plugins raise their own types; pyo3 panics are BaseExceptions
                failures.append(f"{plugin}: {type(exc).__name__}: {exc}")
                continue
            note = f"{plugin} after {'; '.join(failures)}" if failures else None
            return _single_channel(stored, ds), note
    raise DicomSeriesError(f"cannot decode {transfer_syntax.name}: {' | '.join(failures)}", ds.filename)


def _check_codestream(ds: Dataset) -> None:
    """Refuse a JPEG-family frame that is cut short or whose own size contradicts the header."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    # FFD9 (EOI / EOC) cannot occur inside entropy-coded data; only a few padding bytes may follow it.
    if b"\xff\xd9" not in frame[-16:]:
        raise DicomSeriesError("compressed frame is truncated (no end-of-image marker)", ds.filename)
    size = _codestream_size(frame)
    expected = (int(ds.Rows), int(ds.Columns), 1)
    if size is not None and size != expected:
        raise DicomSeriesError(
            f"compressed frame is {size[0]}x{size[1]} with {size[2]} component(s), the header says "
            f"{expected[0]}x{expected[1]} grey", ds.filename,
        )


def _codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ segment; None if unparsable.

    Hand-written: pydicom parses these headers only privately, and only to read the precision.
    """
    try:
        if frame[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000: SOC, then SIZ at a fixed layout
            width, height, x_offset, y_offset = struct.unpack(">IIII", frame[8:24])
            (components,) = struct.unpack(">H", frame[40:42])
            return height - y_offset, width - x_offset, components
        if frame[:2] != b"\xff\xd8":
            return None
        offset = 2
        while offset + 10 <= len(frame) and frame[offset] == 0xFF:
            marker = frame[offset + 1]
            (length,) = struct.unpack(">H", frame[offset + 2 : offset + 4])
            if marker in _SOF_MARKERS:
                _, height, width, components = struct.unpack(">BHHB", frame[offset + 4 : offset + 10])
                return height, width, components
            offset += 2 + length
    except struct.error:
        return None
    return None


def _single_channel(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if stored.ndim != 2:
        raise DicomSeriesError(f"expected one grey-level frame, decoded shape {stored.shape}", ds.filename)
    return stored


def _plain_native(ds: Dataset, transfer_syntax: str) -> np.ndarray | None:
    """Uncompressed 16-bit grey pixels straight from the bytes; None when another layout needs pydicom.

    Hand-written because pydicom's general native decoder costs ~0.5 ms per 512² slice against
    ~0.05 ms here, which is most of the load time of an uncompressed study. The masking and sign
    extension below reproduce what pydicom does when BitsStored < BitsAllocated (checked by tests).
    """
    if (
        transfer_syntax not in _NATIVE_LITTLE_ENDIAN
        or ds.get("BitsAllocated") != 16
        or ds.get("SamplesPerPixel", 1) != 1
        or ds.get("PixelRepresentation") not in (0, 1)
    ):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    signed = ds.PixelRepresentation == 1
    raw = ds.PixelData
    if len(raw) < rows * columns * 2:
        expected = f"{rows}x{columns} 16-bit pixels"
        raise DicomSeriesError(f"pixel data truncated: {len(raw)} bytes for {expected}", ds.filename)
    stored = np.frombuffer(raw, dtype=np.int16 if signed else np.uint16, count=rows * columns).reshape(rows, columns)
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    if bits_stored < 16:
        unused = 16 - bits_stored
        if signed:
            stored = (stored << unused) >> unused  # arithmetic shift: sign-extends from BitsStored
        else:
            stored = stored & np.uint16((1 << bits_stored) - 1)
    return stored


# --------------------------------------------------------------------------- geometry


def _assemble(hu: np.ndarray, headers: list[SliceHeader], normal: np.ndarray, folder: Path, report: _Report) -> Volume:
    positions = np.stack([h.position for h in headers]).astype(float)  # type: ignore[misc]
    orientation = headers[0].orientation
    assert orientation is not None
    pixel_spacing = headers[0].pixel_spacing
    if pixel_spacing is None:
        report.warn("no PixelSpacing: assuming 1 mm pixels")
        pixel_spacing = (1.0, 1.0)
    dz = _slice_step(positions, headers, normal, report)
    numbers = np.array([_slice_number(h.path) for h in headers], dtype=np.int64)
    study_uids = Counter(h.study_uid for h in headers if h.study_uid)
    volume = Volume(
        hu=hu,
        spacing=(dz, pixel_spacing[0], pixel_spacing[1]),
        positions=positions,
        row_cosine=orientation[:3].astype(float),
        col_cosine=orientation[3:].astype(float),
        slice_numbers=numbers,
        files=[h.path.name for h in headers],
        reversed_numbering=_numbering_decreases(numbers, headers),
        study_uid=study_uids.most_common(1)[0][0] if study_uids else folder.name,
        warnings=report.messages,
    )
    return volume


def _slice_step(positions: np.ndarray, headers: list[SliceHeader], normal: np.ndarray, report: _Report) -> float:
    """Median distance between consecutive slices; reports gaps, uneven steps and gantry tilt."""
    first = headers[0]
    if len(positions) == 1:
        if first.slice_gap_hint is None:
            report.warn("single slice without SpacingBetweenSlices/SliceThickness: assuming 1 mm")
            return 1.0
        report.warn(f"single slice: slice step taken from the header ({first.slice_gap_hint} mm)")
        return float(first.slice_gap_hint)
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    dz = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * dz)
    if gaps.size:
        listed = [f"{steps[i]:.3g} mm between z={i} ({headers[i].path.name}) and {headers[i + 1].path.name}"
                  for i in gaps]
        report.warn(f"non-uniform slices: {gaps.size} gap(s) (median step {dz:.3g} mm): {_names(listed)}")
    elif np.any(np.abs(steps - dz) > 0.1 * dz):
        report.warn(f"non-uniform slice steps from {steps.min():.3g} to {steps.max():.3g} mm (median {dz:.3g} mm)")
    direction = (positions[-1] - positions[0]) / np.linalg.norm(positions[-1] - positions[0])
    tilt = float(np.degrees(np.arccos(np.clip(abs(direction @ normal), 0.0, 1.0))))
    if tilt > _TILT_TOLERANCE_DEG:
        report.warn(f"gantry tilt: slices step {tilt:.2f}° off the slice normal (data kept, volume is sheared)")
    return dz


def _numbering_decreases(numbers: np.ndarray, headers: list[SliceHeader]) -> bool:
    """True when the file numbers (else InstanceNumbers) fall from superior to inferior."""
    valid = numbers[numbers >= 0]
    if len(valid) < 2:
        valid = np.array([h.instance_number for h in headers if h.instance_number is not None])
    # Most steps decide, so one odd number (or a shuffled tail) does not flip the answer.
    return bool(len(valid) >= 2 and np.sign(np.diff(valid)).sum() < 0)

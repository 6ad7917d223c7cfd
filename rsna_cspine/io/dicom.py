"""One folder of axial CT DICOM files → a :class:`~rsna_cspine.io.volume.Volume` in Hounsfield units.

Two passes, and no file is parsed twice. The header pass parses each header with the pixel data
deferred (pydicom records where the pixel bytes start and skips them), picks the series, drops what
cannot be placed and sorts the slices along the slice normal, superior first. The pixel pass reads
each slice's pixel bytes at that file offset and writes them, rescaled per slice, straight into their
row of one preallocated float32 array: uncompressed 16-bit slices with numpy, compressed frames
through pydicom's decoders (GDCM, pylibjpeg, ...) with a fallback to the next plugin when one fails.

Larger folders are read by forked worker processes, in chunks of files: pydicom's parser and the
decoders (pylibjpeg-libjpeg, -openjpeg, GDCM) all hold the GIL, so threads would not run in parallel.
The header pass goes to the workers from 64 files on; the pixel pass from 8 compressed slices on,
each decoded slice coming back through its worker's pipe straight into its row of the output (no
pixel array is pickled, see :class:`_WorkerPool`). Uncompressed slices are read in this process:
reading one costs less than sending it back from a worker.

Every repair (skipped file, dropped slice, gap, decoder fallback, ...) is written to
``Volume.warnings`` and logged; anything that would leave a wrong volume raises
:class:`~rsna_cspine.errors.DicomSeriesError` naming the folder or file and the cause.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import struct
import sys
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    JPEG2000,
    UID,
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

#: pydicom decoding plugins in the order they are tried in this process; a plugin that raises hands
#: over to the next one and the switch is recorded. Plugins pydicom has for a syntax but not listed
#: here come last. The faster first, measured on 512² CT slices on 2 cores (python-gdcm 3.2.6,
#: pylibjpeg-openjpeg 2.6, pylibjpeg-libjpeg 2.5): JPEG Lossless GDCM 6.5 ms vs pylibjpeg (libjpeg)
#: 13-15 ms; JPEG 2000 GDCM 17-24 ms vs pylibjpeg (OpenJPEG) 21-35 ms (real CT series, pydicom's
#: 693_J2KR, phantom), because GDCM decodes JPEG 2000 on two threads (37 ms of CPU per phantom
#: slice). It is also pydicom's own default order, so values match ``ds.pixel_array``.
DECODING_PLUGINS: dict[str, tuple[str, ...]] = {}
#: Order for every syntax not in :data:`DECODING_PLUGINS` (JPEG 2000, JPEG Lossless, JPEG-LS, RLE, ...).
DEFAULT_DECODING_PLUGINS: tuple[str, ...] = ("gdcm", "pylibjpeg")
#: Order in worker processes, where every core already decodes a slice of its own: there the
#: decoder using the least CPU wins, and for JPEG 2000 that is single-threaded pylibjpeg (33 ms of
#: CPU per phantom slice against GDCM's 37-40 ms). Lossless decoders give identical values (tested).
WORKER_DECODING_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEG2000Lossless: ("pylibjpeg", "gdcm"),
    JPEG2000: ("pylibjpeg", "gdcm"),
}

#: Elements larger than this are not read in the header pass (the pixel data, vendor blobs).
_DEFER_BYTES = 4096
#: Positions closer than this along the slice normal are the same slice (mm).
_DUPLICATE_TOLERANCE_MM = 0.01
#: A step longer than this many times the median step is a gap (missing slices).
_GAP_FACTOR = 1.5
#: Angle between the slice normal and the slice-to-slice step above which a series counts as tilted.
_TILT_TOLERANCE_DEG = 0.1
#: Smallest folders loaded by a worker pool. Starting and stopping two forked workers costs ~15 ms
#: and each file ~0.1 ms of messaging; parsing a header costs ~0.7 ms, decoding a compressed slice
#: 6-25 ms, so below these counts the pool costs more than it saves.
_MIN_FILES_FOR_POOL_COMPRESSED = 8
_MIN_FILES_FOR_POOL_UNCOMPRESSED = 64
#: Files per worker task: enough work per task (~10-100 ms) to hide the messaging, small enough
#: that no worker idles long at the end of a study.
_HEADERS_PER_TASK = 16
_SLICES_PER_TASK = 2
#: At most this many file names are quoted in one message.
_MAX_NAMED = 5
#: Larger |ImagePositionPatient| coordinates (mm) are corrupt values, not a patient position.
_MAX_COORDINATE_MM = 1e5
#: Larger Rows × Columns is a corrupt header (8192² is far above any CT matrix).
_MAX_PIXELS = 8192 * 8192
#: How far from 1 the length of an orientation cosine may be (rounded values in real headers).
_UNIT_TOLERANCE = 1e-2
_FLOAT32_MAX = float(np.finfo(np.float32).max)
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

#: What decoding one slice gave: (note naming a fallback decoder or None, error or None).
_Outcome = tuple[str | None, str | None]


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

    @property
    def is_compressed(self) -> bool:
        return UID(self.transfer_syntax).is_compressed

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
    return _read_header(Path(path))


def read_slice_hu(path: str | Path, *, plugins: Sequence[str] | None = None) -> np.ndarray:
    """Decode one file to a float32 ``(rows, columns)`` array in HU (stored value × slope + intercept).

    Args:
        path: a single-frame DICOM file.
        plugins: pydicom decoding plugins to try first, in order ("pylibjpeg", "gdcm", ...); None
            → :data:`DECODING_PLUGINS` for the file's transfer syntax.

    Raises:
        DicomSeriesError: the file is not DICOM, has no pixel data or cannot be decoded.
    """
    header = _read_header(Path(path))
    stored, _ = _stored_values(header, None if plugins is None else tuple(plugins))
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
        workers: worker processes reading and decoding the slices; None → min(available CPUs, 4);
            1 → all in this process. Small folders, daemonic processes (a torch DataLoader worker)
            and systems other than Linux (no cheap fork) always load in-process.
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
    n_workers = _resolve_workers(workers)
    if not folder.exists():
        raise DicomSeriesError("folder does not exist", folder)
    if not folder.is_dir():
        raise DicomSeriesError("not a folder", folder)
    paths = sorted((p for p in folder.iterdir() if p.is_file()), key=_natural_key)
    if not paths:
        raise DicomSeriesError("folder is empty", folder)

    report = _Report(folder)
    with _worker_pool(paths, n_workers, report) as pool:
        headers, bad, pool = _read_headers(paths, report, pool)
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
        hu, failed = _decode_series(headers, pool, report)
    if failed:
        bad += [(headers[i].path, reason) for i, reason in failed.items()]
        _check_valid_fraction(folder, n_expected, bad, min_valid_fraction)
        keep = [i for i in range(len(headers)) if i not in failed]
        hu = hu[keep]
        headers = [headers[i] for i in keep]
    if bad:
        report.warn(f"skipped {len(bad)} slice file(s): {_names([f'{p.name} ({why})' for p, why in bad])}")
    return _assemble(hu, headers, normal, folder, report)


# --------------------------------------------------------------------------- worker pool


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


class _WorkerDied(Exception):
    """A worker process ended while it owed replies (killed, crashed in native code, ...)."""


class _WorkerPool:
    """Forked worker processes, each answering on its own pipe; tasks go to whichever worker is free.

    Hand-written rather than a ``ProcessPoolExecutor`` because of how the results travel. A decoded
    slice (1 MiB for 512² float32) is read from the pipe straight into its row of the output volume.
    Moving 200 such slices cost 0.14 CPU-s this way against 1.0 s as pickled float32 results, 0.43 s
    as pickled int16 rescaled by the parent, and ~0.4 s through a shared-memory volume (memfd or
    /dev/shm), whose 4 KiB pages (no transparent huge pages for shmem) fault in slowly (measured on
    the 2-core dev VM).

    The workers are forked: they start in milliseconds and, unlike spawn/forkserver, do not re-import
    the caller's ``__main__``. They only run pydicom, numpy and the codecs, so threads of the parent
    (torch) do not matter.
    """

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.count = count
        self.broken = False
        self._connections: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for _ in range(count):
                parent_end, child_end = context.Pipe(duplex=True)
                self._connections.append(parent_end)
                # The worker closes the parent's ends it inherits: only its own exit then reads as EOF here.
                inherited = list(self._connections)
                process = context.Process(target=_worker_main, args=(child_end, inherited), daemon=True)
                try:
                    process.start()
                finally:
                    child_end.close()
                self._processes.append(process)
        except BaseException:
            self.close(graceful=True)
            raise

    def run(
        self,
        tasks: Sequence[tuple[str, Any]],
        replies: Sequence[int],
        receive: Callable[[Connection, int, int], None],
    ) -> None:
        """Send each task to a free worker; ``receive(connection, task, k)`` reads the task's k-th reply.

        Replies are read as they arrive, from whichever worker sent one, so no worker waits on a full
        pipe while the parent reads another's.

        Raises:
            _WorkerDied: a worker ended before sending all the replies it owed.
        """
        queue = deque(range(len(tasks)))
        current: dict[Connection, list[int]] = {}  # connection → [task index, replies read]

        def assign(connection: Connection) -> None:
            if queue:
                index = queue.popleft()
                connection.send(tasks[index])
                current[connection] = [index, 0]

        try:
            for connection in self._connections:
                assign(connection)
            while current:
                for connection in wait(list(current)):
                    index, read = current[connection]
                    receive(connection, index, read)  # type: ignore[arg-type]
                    if read + 1 < replies[index]:
                        current[connection][1] = read + 1
                    else:
                        del current[connection]
                        assign(connection)
        except (EOFError, OSError) as exc:  # a closed pipe: its worker is gone
            self.broken = True
            codes = [p.exitcode for p in self._processes if p.exitcode is not None]
            raise _WorkerDied(f"a worker process ended (exit code {codes or 'unknown'})") from exc

    def close(self, *, graceful: bool) -> None:
        """Stop the workers: ask idle ones to exit, terminate any that may be busy or blocked."""
        for connection, process in zip(self._connections, self._processes):
            if graceful and not self.broken:
                with contextlib.suppress(OSError):
                    connection.send(None)
            else:
                process.terminate()
        for process in self._processes:
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()


def _worker_main(connection: Connection, inherited: list[Connection]) -> None:
    """A worker's loop: answer tasks until told to stop (None) or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    for other in inherited:  # the parent's ends, copied by the fork
        other.close()
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        kind, payload = task
        if kind == "headers":
            connection.send(_read_header_chunk(payload))
            continue
        for outcome, row in _decode_file(payload):
            connection.send(outcome)
            if outcome[1] is None:
                _send_raw(connection, row)


def _send_raw(connection: Connection, array: np.ndarray) -> None:
    """Write a C-contiguous array's bytes to the pipe, unframed: the reader knows their number.

    Hand-written next to ``Connection.send_bytes`` because its reader (``recv_bytes_into``) goes
    through an intermediate buffer: two copies of every slice in the parent instead of one.
    """
    view = memoryview(array).cast("B")
    sent = 0
    while sent < len(view):
        sent += os.write(connection.fileno(), view[sent:])


def _recv_raw_into(connection: Connection, out: np.ndarray) -> None:
    """Read exactly ``out.nbytes`` bytes sent by :func:`_send_raw` straight into ``out``."""
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = os.readv(connection.fileno(), [view[got:]])
        if n == 0:
            raise EOFError("worker pipe closed in the middle of a slice")
        got += n


@contextlib.contextmanager
def _worker_pool(paths: list[Path], workers: int, report: _Report) -> Iterator[_WorkerPool | None]:
    """A pool for loading ``paths`` when it pays off, else None; stopped on exit."""
    threshold = _MIN_FILES_FOR_POOL_COMPRESSED if _looks_compressed(paths[0]) else _MIN_FILES_FOR_POOL_UNCOMPRESSED
    if workers < 2 or len(paths) < threshold or not sys.platform.startswith("linux"):
        yield None
        return
    try:
        pool = _WorkerPool(workers)
    except OSError as exc:  # fork refused (process or memory limits): the same work, in-process
        report.warn(f"cannot start {workers} worker processes ({exc}); loading in-process")
        yield None
        return
    graceful = False
    try:
        yield pool
        graceful = True
    finally:
        pool.close(graceful=graceful)


def _looks_compressed(path: Path) -> bool:
    """Whether the first file of a folder is compressed (its file meta only; False when unreadable)."""
    try:
        return UID(str(read_file_meta_info(path).get("TransferSyntaxUID", ""))).is_compressed
    except Exception:  # noqa: BLE001 - any unreadable or non-DICOM first file: decide as uncompressed
        return False


def _chunks(n: int, per_task: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)``, at least two tasks per worker when n allows."""
    size = max(1, min(per_task, math.ceil(n / (2 * workers))))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


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


def _floats(value: object, n: int) -> list[float] | None:
    """``n`` finite numbers from a multi-valued element, else None (plain floats: numpy is slow on 3 values)."""
    try:
        out = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _read_header(path: Path) -> SliceHeader:
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
    return replace(header, notes=notes) if notes else header


def _header_from_dataset(path: Path, ds: Dataset) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or ImplicitVRLittleEndian)
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise DicomSeriesError(f"unknown transfer syntax {transfer_syntax!r}", path)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        unit = abs(math.hypot(*row) - 1) <= _UNIT_TOLERANCE and abs(math.hypot(*col) - 1) <= _UNIT_TOLERANCE
        if not (unit and abs(sum(r * c for r, c in zip(row, col))) < 1e-2):
            orientation = None
    position = _floats(ds.get("ImagePositionPatient"), 3)
    if position is not None and max(abs(v) for v in position) > _MAX_COORDINATE_MM:
        position = None
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    rows, columns = ds.get("Rows"), ds.get("Columns")
    instance = ds.get("InstanceNumber")
    slope = _rescale_value(ds.get("RescaleSlope"), 1.0)
    intercept = _rescale_value(ds.get("RescaleIntercept"), 0.0)
    # Stored values have at most 32 bits: this bound keeps every HU finite in float32.
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0
            and abs(slope) * 2.0**32 + abs(intercept) < _FLOAT32_MAX):
        raise DicomSeriesError(f"RescaleSlope {slope} / RescaleIntercept {intercept} cannot give finite HU", path)
    has_pixel_data = "PixelData" in ds
    pixel_offset, pixel_format = None, {}
    if has_pixel_data:
        # keep_deferred: the element's length and file offset, without reading the pixel bytes.
        element = ds.get_item("PixelData", keep_deferred=True)
        _check_pixel_format(ds, path, syntax.is_compressed, getattr(element, "length", None))
        pixel_format = _pixel_format(ds)
        # Offsets are file positions only where the dataset is stored as is (not deflated) and in
        # little-endian order, the only order the fast readers below handle.
        readable_at_offset = syntax in _NATIVE_LITTLE_ENDIAN or (syntax.is_encapsulated and not syntax.is_deflated)
        if isinstance(element, RawDataElement) and readable_at_offset and pixel_format:
            pixel_offset = int(element.value_tell)
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        position=None if position is None else np.array(position),
        orientation=None if orientation is None else np.array(orientation),
        pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
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


def _rescale_value(value: object, default: float) -> float:
    """RescaleSlope/Intercept as a float; ``default`` when absent or empty (not when 0)."""
    return default if value is None or value == "" else float(value)  # type: ignore[arg-type]


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


def _header_or_reason(path: Path) -> SliceHeader | str:
    """The header, or why the file cannot give one (``DicomSeriesError.reason``)."""
    try:
        return _read_header(path)
    except DicomSeriesError as exc:
        return exc.reason


def _read_header_chunk(paths: list[Path]) -> list[SliceHeader | str]:
    """Worker entry point of the header pass."""
    return [_header_or_reason(path) for path in paths]


def _read_headers(
    paths: list[Path], report: _Report, pool: _WorkerPool | None
) -> tuple[list[SliceHeader], list[tuple[Path, str]], _WorkerPool | None]:
    """Headers of the readable files, the unreadable ones with the reason, and the pool (None if it broke)."""
    results: list[SliceHeader | str] | None = None
    if pool is not None:
        ranges = _chunks(len(paths), _HEADERS_PER_TASK, pool.count)
        replies: list[list[SliceHeader | str]] = [[] for _ in ranges]

        def receive(connection: Connection, task: int, _: int) -> None:
            replies[task] = connection.recv()

        try:
            pool.run([("headers", paths[start:stop]) for start, stop in ranges], [1] * len(ranges), receive)
            results = [item for reply in replies for item in reply]
        except _WorkerDied as exc:
            report.warn(f"header pool failed ({exc}); reading headers in-process instead")
            pool = None
    if results is None:
        results = [_header_or_reason(path) for path in paths]

    headers: list[SliceHeader] = []
    bad: list[tuple[Path, str]] = []
    not_dicom: list[str] = []
    pydicom_notes: Counter[str] = Counter()
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, str):
            if result.startswith("not a DICOM file"):
                not_dicom.append(path.name)
            else:
                bad.append((path, result))
            continue
        headers.append(result)
        pydicom_notes.update(result.notes)
    if not_dicom:
        report.warn(f"skipped {len(not_dicom)} non-DICOM file(s): {_names(not_dicom)}")
    for note, count in list(pydicom_notes.items())[:_MAX_NAMED]:
        report.warn(f"pydicom ({count} file(s)): {note}")
    if len(pydicom_notes) > _MAX_NAMED:
        report.warn(f"pydicom: {len(pydicom_notes) - _MAX_NAMED} more distinct header warning(s) not shown")
    if not headers:
        detail = f"; unreadable: {_names([f'{p.name} ({r})' for p, r in bad])}" if bad else ""
        raise DicomSeriesError(f"no readable DICOM file among {len(paths)} file(s){detail}", report.folder)
    return headers, bad, pool


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


def _decode_series(
    headers: list[SliceHeader], pool: _WorkerPool | None, report: _Report
) -> tuple[np.ndarray, dict[int, str]]:
    """The float32 HU volume of ``headers`` (in their order) and {index: reason} of the slices that failed."""
    shape = (len(headers), *headers[0].matrix)  # type: ignore[misc]
    try:
        hu = np.empty(shape, dtype=np.float32)
    except MemoryError as exc:
        raise DicomSeriesError(f"cannot allocate a {shape} float32 volume", report.folder) from exc
    outcomes: list[_Outcome] | None = None
    # Uncompressed slices stay here: reading one costs less than sending its 1 MiB back from a worker.
    if pool is not None and sum(h.is_compressed for h in headers) >= _MIN_FILES_FOR_POOL_COMPRESSED:
        try:
            outcomes = _decode_in_pool(headers, hu, pool)
        except _WorkerDied as exc:
            report.warn(f"decoder pool failed ({exc}); decoding in-process instead")
    if outcomes is None:
        scratch = _scratch_for(shape[1:])
        outcomes = [_decode_slice_into(header, row, scratch) for header, row in zip(headers, hu, strict=True)]
    failed = {index: error for index, (_, error) in enumerate(outcomes) if error is not None}
    fallbacks = [f"{h.path.name} ({note})" for h, (note, error) in zip(headers, outcomes) if note and error is None]
    if fallbacks:
        report.warn(f"decoder fallback used for {len(fallbacks)} slice(s): {_names(fallbacks)}")
    return hu, failed


def _decode_in_pool(headers: list[SliceHeader], hu: np.ndarray, pool: _WorkerPool) -> list[_Outcome]:
    """Decode in the workers; each decoded slice is read from its pipe straight into ``hu``."""
    ranges = _chunks(len(headers), _SLICES_PER_TASK, pool.count)
    outcomes: list[_Outcome] = [(None, "not decoded")] * len(headers)

    def receive(connection: Connection, task: int, k: int) -> None:
        index = ranges[task][0] + k
        outcomes[index] = connection.recv()
        if outcomes[index][1] is None:
            _recv_raw_into(connection, hu[index])

    tasks = [("pixels", headers[start:stop]) for start, stop in ranges]
    pool.run(tasks, [stop - start for start, stop in ranges], receive)
    return outcomes


def _decode_file(headers: list[SliceHeader]) -> Iterator[tuple[_Outcome, np.ndarray]]:
    """Worker entry point of the pixel pass: each slice's outcome and its HU (one reused buffer).

    Args:
        headers: a chunk of slices sharing one matrix size.
    """
    row = np.empty(headers[0].matrix, dtype=np.float32)  # type: ignore[arg-type]
    scratch = _scratch_for(row.shape)
    for header in headers:
        plugins = WORKER_DECODING_PLUGINS.get(header.transfer_syntax)
        yield _decode_slice_into(header, row, scratch, plugins), row


def _scratch_for(matrix: tuple[int, ...]) -> np.ndarray:
    """A raw buffer, reused from slice to slice, that uncompressed 16-bit pixels are read into."""
    return np.empty(math.prod(matrix), dtype=np.uint16)


def _decode_slice_into(
    header: SliceHeader, row: np.ndarray, scratch: np.ndarray, plugins: tuple[str, ...] | None = None
) -> _Outcome:
    """Decode one slice into ``row`` in HU; a bad file gives an error outcome, never an exception.

    Args:
        header: the slice.
        row: its float32 row of the output.
        scratch: see :func:`_scratch_for`.
        plugins: decoding plugins to try first; None → :data:`DECODING_PLUGINS`.
    """
    try:
        stored, fallback = _stored_values(header, plugins, scratch)
        if stored.shape != row.shape:
            shapes = f"decoded shape {stored.shape} differs from the header's {row.shape}"
            raise DicomSeriesError(shapes, header.path)
        _rescale_into(stored, header.slope, header.intercept, row)
    except Exception as exc:  # one bad file is one failed slice, reported with its reason
        return None, str(exc.reason if isinstance(exc, DicomSeriesError) else f"{type(exc).__name__}: {exc}")
    return fallback, None


def _rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """``out = stored * slope + intercept`` in float32 without a float64 temporary."""
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
    else:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
        out += np.float32(intercept)


def _stored_values(
    header: SliceHeader, plugins: tuple[str, ...] | None, scratch: np.ndarray | None = None
) -> tuple[np.ndarray, str | None]:
    """Stored pixel values of one slice and a note when a fallback decoder was needed.

    Args:
        header: the slice's header.
        plugins: decoding plugins to try first; None → :data:`DECODING_PLUGINS`.
        scratch: a uint16 buffer of at least Rows × Columns to read uncompressed 16-bit pixels into
            (the result may be a view of it); None → a new one.
    """
    if not header.has_pixel_data:
        raise DicomSeriesError("no pixel data", header.path)
    syntax = UID(header.transfer_syntax)
    fmt = header.pixel_format
    if header.pixel_offset is not None:
        if fmt["number_of_frames"] != 1:
            frames = fmt["number_of_frames"]
            raise DicomSeriesError(f"multi-frame file ({frames} frames) is not an axial slice", header.path)
        if syntax in _NATIVE_LITTLE_ENDIAN and _is_plain_16_bit(fmt):
            return _read_native_16_bit(header, scratch), None
        if syntax.is_encapsulated:
            return _decode_encapsulated(header, plugins)
    # Every other layout (8/32-bit, big-endian, deflated, odd Image Pixel values): pydicom, whole file.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header notes were already collected in the header pass
            ds = pydicom.dcmread(header.path)
    except Exception as exc:
        raise DicomSeriesError(f"unreadable ({type(exc).__name__}: {exc})", header.path) from exc
    return _decode_dataset(ds, plugins)


def _is_plain_16_bit(fmt: dict[str, Any]) -> bool:
    return (
        fmt.get("bits_allocated") == 16
        and fmt.get("samples_per_pixel", 1) == 1
        and fmt.get("pixel_representation") in (0, 1)
        and isinstance(fmt.get("bits_stored"), int)
        and 1 <= fmt["bits_stored"] <= 16
        and isinstance(fmt.get("rows"), int)
        and isinstance(fmt.get("columns"), int)
    )


def _read_native_16_bit(header: SliceHeader, scratch: np.ndarray | None) -> np.ndarray:
    """Uncompressed little-endian 16-bit grey pixels read at their file offset.

    Hand-written because pydicom's general native decoder costs ~0.5 ms per 512² slice against
    ~0.05 ms here, which is a large share of the load time of an uncompressed study. The masking
    and sign extension reproduce what pydicom does when BitsStored < BitsAllocated (checked by tests).
    """
    fmt = header.pixel_format
    rows, columns = fmt["rows"], fmt["columns"]
    count = rows * columns
    dtype = np.int16 if fmt["pixel_representation"] == 1 else np.uint16
    buffer = scratch[:count].view(dtype) if scratch is not None and scratch.size >= count else np.empty(count, dtype)
    with open(header.path, "rb") as file:
        file.seek(header.pixel_offset)  # type: ignore[arg-type]
        got = file.readinto(buffer)
    if got < count * 2:
        raise DicomSeriesError(f"pixel data truncated: {got} bytes for {rows}x{columns} 16-bit pixels", header.path)
    stored = buffer.reshape(rows, columns)
    unused = 16 - fmt["bits_stored"]
    if unused and dtype is np.int16:
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)  # arithmetic shift: sign-extends from BitsStored
    elif unused:
        np.bitwise_and(stored, np.uint16((1 << fmt["bits_stored"]) - 1), out=stored)
    return stored


def _decode_encapsulated(header: SliceHeader, plugins: tuple[str, ...] | None) -> tuple[np.ndarray, str | None]:
    """Decode a compressed frame read at its file offset, with the header's Image Pixel values."""
    with open(header.path, "rb") as file:
        file.seek(header.pixel_offset)  # type: ignore[arg-type]
        # To the end of the file: the encapsulated value ends at its sequence delimiter, where
        # pydicom stops; anything after it (trailing padding) is ignored.
        encapsulated = file.read()
    syntax = UID(header.transfer_syntax)
    if syntax in _JPEG_FAMILY:
        _check_codestream(encapsulated, header.pixel_format["rows"], header.pixel_format["columns"], header.path)
    return _decode_with_plugins(encapsulated, syntax, header.pixel_format, header.path, plugins)


def _decode_dataset(ds: Dataset, plugins: tuple[str, ...] | None) -> tuple[np.ndarray, str | None]:
    """Stored pixel values of a single-frame dataset and a note when a fallback decoder was needed."""
    if "PixelData" not in ds:
        raise DicomSeriesError("no pixel data", ds.filename)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomSeriesError(f"multi-frame file ({frames} frames) is not an axial slice", ds.filename)
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:  # pydicom's own native decoder, no plugins involved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _single_channel(get_decoder(syntax).as_array(ds)[0], ds.filename), None
    if syntax in _JPEG_FAMILY:
        _check_codestream(ds.PixelData, int(ds.Rows), int(ds.Columns), ds.filename)
    return _decode_with_plugins(ds, syntax, {}, ds.filename, plugins)


def _decode_with_plugins(
    source: Dataset | bytes,
    syntax: UID,
    options: dict[str, Any],
    path: str | Path | None,
    plugins: tuple[str, ...] | None,
) -> tuple[np.ndarray, str | None]:
    """Try the decoding plugins in order; the first that succeeds gives the array (and a note if not the first).

    Args:
        source: a dataset, or the encapsulated pixel data (then ``options`` describe the image).
        syntax: its transfer syntax.
        options: pydicom decoding options (``as_pixel_options``) for a bytes ``source``.
        path: the file, for messages.
        plugins: plugins to try first; None → :data:`DECODING_PLUGINS`.
    """
    decoder = get_decoder(syntax)
    available = list(decoder.available_plugins)
    if not available:
        raise DicomSeriesError(f"no installed decoder for {syntax.name}", path)
    if plugins is None:
        plugins = DECODING_PLUGINS.get(syntax, DEFAULT_DECODING_PLUGINS)
    order = [p for p in plugins if p in available] + [p for p in available if p not in plugins]
    failures: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for plugin in order:
            try:
                stored, _ = decoder.as_array(source, decoding_plugin=plugin, **options)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - plugins raise their own types; pyo3 panics are BaseExceptions
                failures.append(f"{plugin}: {type(exc).__name__}: {exc}")
                continue
            note = f"{plugin} after {'; '.join(failures)}" if failures else None
            return _single_channel(stored, path), note
    raise DicomSeriesError(f"cannot decode {syntax.name}: {' | '.join(failures)}", path)


def _check_codestream(encapsulated: bytes, rows: int, columns: int, path: str | Path | None) -> None:
    """Refuse a JPEG-family frame that is cut short or whose own size contradicts the header."""
    frame = next(generate_frames(encapsulated, number_of_frames=1))
    # FFD9 (EOI / EOC) cannot occur inside entropy-coded data; only a few padding bytes may follow it.
    if b"\xff\xd9" not in frame[-16:]:
        raise DicomSeriesError("compressed frame is truncated (no end-of-image marker)", path)
    size = _codestream_size(frame)
    expected = (int(rows), int(columns), 1)
    if size is not None and size != expected:
        raise DicomSeriesError(
            f"compressed frame is {size[0]}x{size[1]} with {size[2]} component(s), the header says "
            f"{expected[0]}x{expected[1]} grey", path,
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


def _single_channel(stored: np.ndarray, path: str | Path | None) -> np.ndarray:
    if stored.ndim != 2:
        raise DicomSeriesError(f"expected one grey-level frame, decoded shape {stored.shape}", path)
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

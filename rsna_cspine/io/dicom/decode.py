"""The pixel pass: each slice's stored values → HU, written into its row of one preallocated volume.

Uncompressed 16-bit slices are read at their file offset with numpy; compressed frames go through
pydicom's decoders (GDCM, pylibjpeg, ...) with a fallback to the next plugin when one fails. From
8 compressed slices on, worker processes decode and each slice comes back through its worker's pipe
straight into its row (see :mod:`rsna_cspine.io.dicom.pool`); uncompressed slices are read in this
process: reading one costs less than sending it back from a worker.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom.headers import NATIVE_LITTLE_ENDIAN, SliceHeader, read_slice_header
from rsna_cspine.io.dicom.multiframe import encapsulated_frame
from rsna_cspine.io.dicom.pool import MIN_FILES_FOR_POOL_COMPRESSED, WorkerDied, WorkerPool, chunks, recv_raw_into
from rsna_cspine.io.dicom.report import LoadReport, quote_names

#: pydicom decoding plugins in the order they are tried in this process; a plugin that raises hands
#: over to the next one and the switch is recorded. Plugins pydicom has for a syntax but not listed
#: here come last. The faster first, measured on 512² CT slices on 2 cores (python-gdcm 3.2.6,
#: pylibjpeg-openjpeg 2.6, pylibjpeg-libjpeg 2.5): JPEG Lossless GDCM 6.5 ms vs pylibjpeg (libjpeg)
#: 13-15 ms; JPEG 2000 GDCM 17-24 ms vs pylibjpeg (OpenJPEG) 21-35 ms (real CT series, pydicom's
#: 693_J2KR, phantom), because GDCM decodes JPEG 2000 on two threads (37 ms of CPU per phantom
#: slice). It is also pydicom's own default order, so values match ``ds.pixel_array``.
DEFAULT_DECODING_PLUGINS: tuple[str, ...] = ("gdcm", "pylibjpeg")
#: Order in worker processes, where every core already decodes a slice of its own: there the
#: decoder using the least CPU wins, and for JPEG 2000 that is single-threaded pylibjpeg (33 ms of
#: CPU per phantom slice against GDCM's 37-40 ms). Lossless decoders give identical values (tested).
WORKER_DECODING_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEG2000Lossless: ("pylibjpeg", "gdcm"),
    JPEG2000: ("pylibjpeg", "gdcm"),
}

#: Whether slices decoded in this process use the single-threaded decoders (:func:`single_threaded_decoding`).
_SINGLE_THREADED = False

#: Compressed slices per worker task.
_SLICES_PER_TASK = 2
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

#: What decoding one slice gave: (note naming a fallback decoder or None, error or None).
Outcome = tuple[str | None, str | None]


@contextlib.contextmanager
def single_threaded_decoding(enabled: bool = True) -> Iterator[None]:
    """Within the block, series decoded in this process (no worker pool) use the decoders the pool's
    workers use (:data:`WORKER_DECODING_PLUGINS`): one thread per slice.

    For a process that is one of several decoding at once, each on one core (``rsna-cspine prepare``'s
    workers): GDCM decodes JPEG 2000 on one thread per CPU of the machine, whatever the process's share,
    so two such workers on two cores ran four decoder threads and a "one-core" worker used both cores.
    Lossless decoders give identical values.

    Args:
        enabled: False leaves the default decoders (e.g. a study's budget of several threads).
    """
    global _SINGLE_THREADED
    before, _SINGLE_THREADED = _SINGLE_THREADED, enabled
    try:
        yield
    finally:
        _SINGLE_THREADED = before


def read_slice_hu(path: str | Path, *, plugins: Sequence[str] | None = None) -> np.ndarray:
    """Decode one file to a float32 ``(rows, columns)`` array in HU (stored value × slope + intercept).

    Args:
        path: a single-frame DICOM file.
        plugins: pydicom decoding plugins to try first, in order ("pylibjpeg", "gdcm", ...); None
            → :data:`DEFAULT_DECODING_PLUGINS`.

    Raises:
        DicomSeriesError: the file is not DICOM, has no pixel data or cannot be decoded.
    """
    header = read_slice_header(path)
    stored, _ = _stored_values(header, None if plugins is None else tuple(plugins))
    out = np.empty(stored.shape, dtype=np.float32)
    _rescale_into(stored, header.slope, header.intercept, out)
    return out


def decode_series(
    headers: list[SliceHeader], pool: WorkerPool | None, report: LoadReport
) -> tuple[np.ndarray, dict[int, str]]:
    """The float32 HU volume of ``headers`` (in their order) and {index: reason} of the slices that failed.

    Args:
        headers: the series' slices, ordered, sharing one matrix size.
        pool: worker processes with a ``pixels`` handler (:func:`decode_chunk`), or None.
        report: where fallbacks and a failed pool are reported.
    """
    shape = (len(headers), *headers[0].matrix)  # type: ignore[misc]
    try:
        hu = np.empty(shape, dtype=np.float32)
    except MemoryError as exc:
        raise DicomSeriesError(f"cannot allocate a {shape} float32 volume", report.folder) from exc
    outcomes: list[Outcome] | None = None
    # Uncompressed slices stay here: reading one costs less than sending its 1 MiB back from a worker.
    if pool is not None and sum(h.is_compressed for h in headers) >= MIN_FILES_FOR_POOL_COMPRESSED:
        try:
            outcomes = _decode_in_pool(headers, hu, pool)
        except WorkerDied as exc:
            report.warn(f"decoder pool failed ({exc}); decoding in-process instead")
    if outcomes is None:
        scratch = _scratch_for(shape[1:])
        choice = WORKER_DECODING_PLUGINS if _SINGLE_THREADED else {}
        outcomes = [_decode_slice_into(header, row, scratch, choice.get(header.transfer_syntax))
                    for header, row in zip(headers, hu, strict=True)]
    failed = {index: error for index, (_, error) in enumerate(outcomes) if error is not None}
    fallbacks = [f"{h.name} ({note})" for h, (note, error) in zip(headers, outcomes) if note and error is None]
    if fallbacks:
        report.warn(f"decoder fallback used for {len(fallbacks)} slice(s): {quote_names(fallbacks)}")
    return hu, failed


def _decode_in_pool(headers: list[SliceHeader], hu: np.ndarray, pool: WorkerPool) -> list[Outcome]:
    """Decode in the workers; each decoded slice is read from its pipe straight into ``hu``."""
    ranges = chunks(len(headers), _SLICES_PER_TASK, pool.count)
    outcomes: list[Outcome] = [(None, "not decoded")] * len(headers)

    def receive(connection: Connection, task: int, k: int) -> None:
        index = ranges[task][0] + k
        outcomes[index] = connection.recv()
        if outcomes[index][1] is None:
            recv_raw_into(connection, hu[index])

    tasks = [("pixels", headers[start:stop]) for start, stop in ranges]
    pool.run(tasks, [stop - start for start, stop in ranges], receive)
    return outcomes


def decode_chunk(headers: list[SliceHeader]) -> Iterator[Outcome | np.ndarray]:
    """Worker entry point of the pixel pass: each slice's outcome, followed by its HU when it decoded.

    The HU row is one buffer reused from slice to slice: the pool sends it before the next one is decoded.

    Args:
        headers: a chunk of slices sharing one matrix size.
    """
    row = np.empty(headers[0].matrix, dtype=np.float32)  # type: ignore[arg-type]
    scratch = _scratch_for(row.shape)
    for header in headers:
        plugins = WORKER_DECODING_PLUGINS.get(header.transfer_syntax)
        outcome = _decode_slice_into(header, row, scratch, plugins)
        yield outcome
        if outcome[1] is None:
            yield row


def _scratch_for(matrix: tuple[int, ...]) -> np.ndarray:
    """A raw buffer, reused from slice to slice, that uncompressed 16-bit pixels are read into."""
    return np.empty(math.prod(matrix), dtype=np.uint16)


def _decode_slice_into(
    header: SliceHeader, row: np.ndarray, scratch: np.ndarray, plugins: tuple[str, ...] | None = None
) -> Outcome:
    """Decode one slice into ``row`` in HU; a bad file gives an error outcome, never an exception.

    Args:
        header: the slice.
        row: its float32 row of the output.
        scratch: see :func:`_scratch_for`.
        plugins: decoding plugins to try first; None → :data:`DEFAULT_DECODING_PLUGINS`.
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
        plugins: decoding plugins to try first; None → :data:`DEFAULT_DECODING_PLUGINS`.
        scratch: a uint16 buffer of at least Rows × Columns to read uncompressed 16-bit pixels into
            (the result may be a view of it); None → a new one.
    """
    if not header.has_pixel_data:
        raise DicomSeriesError("no pixel data", header.path)
    syntax = UID(header.transfer_syntax)
    fmt = header.pixel_format
    if header.pixel_offset is not None:
        if fmt["number_of_frames"] != 1 and header.frame is None:
            frames = fmt["number_of_frames"]
            raise DicomSeriesError(f"multi-frame file ({frames} frames) is not an axial slice", header.path)
        if syntax in NATIVE_LITTLE_ENDIAN and _is_plain_16_bit(fmt) and fmt["number_of_frames"] == 1:
            return _read_native_16_bit(header, scratch), None
        if syntax.is_encapsulated:
            return _decode_encapsulated(header, plugins)
    # Every other layout (8/32-bit, big-endian, deflated, odd Image Pixel values): pydicom, whole file.
    if header.frame is not None:
        stat = os.stat(header.path)
        return _decode_dataset(_parsed(str(header.path), stat.st_mtime_ns, stat.st_size), plugins, header.frame)
    return _decode_dataset(_parsed(str(header.path)), plugins)


def _parsed(path: str, mtime_ns: int = 0, size: int = 0) -> Dataset:
    """The whole file parsed by pydicom (see :func:`_parsed_cached` for multi-frame files)."""
    if mtime_ns:
        return _parsed_cached(path, mtime_ns, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header notes were already collected in the header pass
            return pydicom.dcmread(path)
    except Exception as exc:
        raise DicomSeriesError(f"unreadable ({type(exc).__name__}: {exc})", path) from exc


@functools.lru_cache(maxsize=1)
def _parsed_cached(path: str, mtime_ns: int, size: int) -> Dataset:
    """A multi-frame file parsed once per process for all its frames (keyed by modification time and size)."""
    return _parsed(path)


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
    if header.frame is not None:
        encapsulated = encapsulated_frame(header)
    else:
        with open(header.path, "rb") as file:
            file.seek(header.pixel_offset)  # type: ignore[arg-type]
            # To the end of the file: the encapsulated value ends at its sequence delimiter, where
            # pydicom stops; anything after it (trailing padding) is ignored.
            encapsulated = file.read()
    syntax = UID(header.transfer_syntax)
    if syntax in _JPEG_FAMILY:
        _check_codestream(encapsulated, header.pixel_format["rows"], header.pixel_format["columns"], header.path)
    return _decode_with_plugins(encapsulated, syntax, {**header.pixel_format, "number_of_frames": 1}, header.path,
                                plugins)


def _decode_dataset(
    ds: Dataset, plugins: tuple[str, ...] | None, frame: int | None = None
) -> tuple[np.ndarray, str | None]:
    """Stored pixel values of a single-frame dataset (or of frame ``frame`` of a multi-frame one) and a
    note when a fallback decoder was needed."""
    if "PixelData" not in ds:
        raise DicomSeriesError("no pixel data", ds.filename)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1 and frame is None:
        raise DicomSeriesError(f"multi-frame file ({frames} frames) is not an axial slice", ds.filename)
    index = {} if frame is None else {"index": frame}
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:  # pydicom's own native decoder, no plugins involved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _single_channel(get_decoder(syntax).as_array(ds, **index)[0], ds.filename), None
    if syntax in _JPEG_FAMILY and frame is None:
        _check_codestream(ds.PixelData, int(ds.Rows), int(ds.Columns), ds.filename)
    return _decode_with_plugins(ds, syntax, index, ds.filename, plugins)


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
        plugins: plugins to try first; None → :data:`DEFAULT_DECODING_PLUGINS`.
    """
    decoder = get_decoder(syntax)
    available = list(decoder.available_plugins)
    if not available:
        raise DicomSeriesError(f"no installed decoder for {syntax.name}", path)
    if plugins is None:
        plugins = DEFAULT_DECODING_PLUGINS
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

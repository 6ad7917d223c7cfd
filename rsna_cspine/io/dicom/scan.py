"""The header pass over a series's files: each file's headers (one per frame of a multi-frame file), in
worker processes for large folders, unreadable and non-DICOM files set apart with their reason."""

from __future__ import annotations

from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom.headers import SliceHeader, read_header_and_dataset
from rsna_cspine.io.dicom.multiframe import frame_headers, is_multiframe
from rsna_cspine.io.dicom.pool import WorkerDied, WorkerPool, chunks
from rsna_cspine.io.dicom.report import MAX_NAMED, LoadReport, quote_names

#: Files per worker task: enough work per task (~10-100 ms) to hide the messaging, small enough
#: that no worker idles long at the end of a study.
_HEADERS_PER_TASK = 16


def read_file_headers(path: str | Path) -> list[SliceHeader]:
    """One header per slice the file holds: itself, or each frame of a multi-frame (Enhanced CT) file.

    Args:
        path: a DICOM file.

    Raises:
        DicomSeriesError: the file is not DICOM, cannot be parsed, or its frames cannot be described.
    """
    header, ds = read_header_and_dataset(Path(path))
    if not is_multiframe(header, ds):
        return [header]
    try:
        return frame_headers(header, ds)
    except DicomSeriesError:
        raise
    except Exception as exc:  # malformed functional groups of any kind
        raise DicomSeriesError(f"malformed multi-frame header ({type(exc).__name__}: {exc})", header.path) from exc


def _header_or_reason(path: Path) -> list[SliceHeader] | str:
    """The file's headers (one per frame), or why the file cannot give them (``DicomSeriesError.reason``)."""
    try:
        return read_file_headers(path)
    except DicomSeriesError as exc:
        return exc.reason


def read_header_chunk(paths: list[Path]) -> list[list[SliceHeader] | str]:
    """Worker entry point of the header pass: each file's headers (one per frame), or why it has none."""
    return [_header_or_reason(path) for path in paths]


def read_headers(
    paths: list[Path], report: LoadReport, pool: WorkerPool | None
) -> tuple[list[SliceHeader], list[tuple[Path, str]], WorkerPool | None]:
    """Headers of the readable files, the unreadable ones with the reason, and the pool (None if it broke)."""
    results: list[list[SliceHeader] | str] | None = None
    if pool is not None:
        ranges = chunks(len(paths), _HEADERS_PER_TASK, pool.count)
        replies: list[list[list[SliceHeader] | str]] = [[] for _ in ranges]

        def receive(connection: Connection, task: int, _: int) -> None:
            replies[task] = connection.recv()

        try:
            pool.run([("headers", paths[start:stop]) for start, stop in ranges], [1] * len(ranges), receive)
            results = [item for reply in replies for item in reply]
        except WorkerDied as exc:
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
        headers.extend(result)
        pydicom_notes.update(result[0].notes)
    if not_dicom:
        report.warn(f"skipped {len(not_dicom)} non-DICOM file(s): {quote_names(not_dicom)}")
    for note, count in list(pydicom_notes.items())[:MAX_NAMED]:
        report.warn(f"pydicom ({count} file(s)): {note}")
    if len(pydicom_notes) > MAX_NAMED:
        report.warn(f"pydicom: {len(pydicom_notes) - MAX_NAMED} more distinct header warning(s) not shown")
    if not headers:
        detail = f"; unreadable: {quote_names([f'{p.name} ({r})' for p, r in bad])}" if bad else ""
        raise DicomSeriesError(f"no readable DICOM file among {len(paths)} file(s){detail}", report.folder)
    return headers, bad, pool



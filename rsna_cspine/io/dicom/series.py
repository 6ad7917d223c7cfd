"""Series assembly: a folder of slice files → the slices of one series, in order, then decoded into a Volume.

:func:`load_series` runs the header pass (:mod:`~rsna_cspine.io.dicom.headers`), plans the series
(:func:`plan_slices`: pick the series, drop what cannot be placed, sort along the slice normal,
superior first), runs the pixel pass (:mod:`~rsna_cspine.io.dicom.decode`) and builds the volume
(:mod:`~rsna_cspine.io.dicom.geometry`). A :class:`SeriesPlan` is the seam between planning and
decoding: another way to assemble a series (e.g. Enhanced CT, one multi-frame file whose per-frame
functional groups hold the positions) plugs in as another planner giving the same plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom.decode import decode_chunk, decode_series
from rsna_cspine.io.dicom.geometry import build_volume
from rsna_cspine.io.dicom.headers import SliceHeader, natural_key
from rsna_cspine.io.dicom.scan import read_header_chunk, read_headers
from rsna_cspine.io.dicom.pool import Handler, WorkerPool, resolve_workers, worker_pool
from rsna_cspine.io.dicom.report import LoadReport, quote_names
from rsna_cspine.io.volume import Volume

#: Positions closer than this along the slice normal are the same slice (mm).
_DUPLICATE_TOLERANCE_MM = 0.01

#: Header values every slice of a volume must share; the minority is dropped (or the series refused).
_MUST_AGREE: tuple[tuple[str, Callable[[SliceHeader], object]], ...] = (
    ("matrix size", lambda h: h.matrix),
    ("orientation", lambda h: tuple(np.round(h.orientation, 3).tolist())),  # type: ignore[arg-type]
    ("pixel spacing", lambda h: h.pixel_spacing),
)


@dataclass
class SeriesPlan:
    """A series ready to decode.

    Attributes:
        slices: one header per slice, superior → inferior, all of one matrix size, orientation and spacing.
        normal: unit slice normal pointing superior.
        bad: slices left out (file names, with the frame for a multi-frame file) and the reason.
        n_expected: slices the series should have (usable + left out), the base of ``min_valid_fraction``.
    """

    slices: list[SliceHeader]
    normal: np.ndarray
    bad: list[tuple[str, str]]
    n_expected: int


def load_series(
    folder: str | Path,
    *,
    workers: int | None = None,
    min_valid_fraction: float = 0.9,
) -> Volume:
    """Load a folder of CT slices, or one multi-frame (Enhanced CT) file, as a HU volume ordered superior → inferior.

    A multi-frame file counts as one slice per frame (per-frame positions, spacing and rescale from its
    functional groups); a folder may hold single-frame files, multi-frame files or both.

    Args:
        folder: folder holding the slices (any file names; non-DICOM files are skipped), or one DICOM file.
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
    n_workers = resolve_workers(workers)
    if not folder.exists():
        raise DicomSeriesError("folder does not exist", folder)
    if folder.is_file():
        paths = [folder]
    elif not folder.is_dir():
        raise DicomSeriesError("not a folder or a file", folder)
    else:
        paths = sorted((p for p in folder.iterdir() if p.is_file()), key=natural_key)
    if not paths:
        raise DicomSeriesError("folder is empty", folder)

    report = LoadReport(folder)
    with worker_pool(paths, n_workers, report, _worker_handlers()) as pool:
        plan, pool = plan_slices(paths, report, pool, min_valid_fraction)
        if folder.is_file() and all(h.frame is None for h in plan.slices):
            raise DicomSeriesError("not a folder, and not a multi-frame file: give the study's folder of slices", folder)
        hu, failed = decode_series(plan.slices, pool, report)
    headers, bad = plan.slices, list(plan.bad)
    if failed:
        bad += [(headers[i].name, reason) for i, reason in failed.items()]
        _check_valid_fraction(folder, plan.n_expected, bad, min_valid_fraction)
        keep = [i for i in range(len(headers)) if i not in failed]
        hu = hu[keep]
        headers = [headers[i] for i in keep]
    if bad:
        report.warn(f"skipped {len(bad)} slice file(s): {quote_names([f'{name} ({why})' for name, why in bad])}")
    return build_volume(hu, headers, plan.normal, folder, report)


def _worker_handlers() -> dict[str, Handler]:
    """What the pool's workers run (they are forked when the pool starts, with these functions)."""
    return {"headers": lambda paths: (read_header_chunk(paths),), "pixels": decode_chunk}


def plan_slices(
    paths: list[Path], report: LoadReport, pool: WorkerPool | None, min_valid_fraction: float
) -> tuple[SeriesPlan, WorkerPool | None]:
    """One file per slice: read the headers, keep one series of placeable, consistent slices, sort them.

    Args:
        paths: the folder's files.
        report: where every repair is reported.
        pool: worker processes with a ``headers`` handler, or None.
        min_valid_fraction: see :func:`load_series`.

    Returns:
        The plan, and the pool (None if it broke during the header pass).

    Raises:
        DicomSeriesError: no usable slice, or too many bad files.
    """
    folder = report.folder
    headers, unreadable, pool = read_headers(paths, report, pool)
    bad = [(path.name, reason) for path, reason in unreadable]
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
    return SeriesPlan(headers, normal, bad, n_expected), pool


def _choose_series(
    headers: list[SliceHeader], folder: Path, report: LoadReport
) -> tuple[list[SliceHeader], list[tuple[str, str]]]:
    """The headers of the series with the most slices, and the files that are probably broken."""
    with_pixels = Counter(h.series_uid for h in headers if h.has_pixel_data)
    if not with_pixels:
        raise DicomSeriesError(f"no pixel data in any of {len(headers)} DICOM file(s)", folder)
    # Most slices wins; the UID breaks ties so the choice does not depend on file order.
    chosen = max(with_pixels, key=lambda uid: (with_pixels[uid], uid))
    # A file without a SeriesInstanceUID beside a series that has one is a damaged member (a cut
    # header reads as a short dataset), not another series.
    broken = [(h.name, "no SeriesInstanceUID") for h in headers if chosen and not h.series_uid]
    others: dict[str, list[str]] = {}
    for h in headers:
        if h.series_uid and h.series_uid != chosen:
            others.setdefault(h.series_uid, []).append(h.name)
    if others:
        listed = "; ".join(f"{uid} ({len(names)} files: {quote_names(names)})" for uid, names in others.items())
        kept = f"{chosen or '<no SeriesInstanceUID>'} ({with_pixels[chosen]} slices)"
        report.warn(f"folder mixes series: kept {kept}, ignored {listed}")
    return [h for h in headers if h.series_uid == chosen], broken


def _drop_unplaceable(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[str, str]]]:
    kept = [h for h in headers if h.missing_geometry is None]
    bad = [(h.name, h.missing_geometry) for h in headers if h.missing_geometry is not None]
    return kept, bad  # type: ignore[return-value]


def _keep_majority(
    headers: list[SliceHeader], what: str, key: Callable[[SliceHeader], object], report: LoadReport
) -> tuple[list[SliceHeader], list[tuple[str, str]]]:
    """Keep the slices sharing the most common ``key``; the others are bad slices."""
    if not headers:
        return headers, []
    counts = Counter(key(h) for h in headers)
    if len(counts) == 1:
        return headers, []
    majority = max(counts, key=lambda k: (counts[k], str(k)))
    kept = [h for h in headers if key(h) == majority]
    bad = [(h.name, f"{what} {key(h)} differs from the series' {majority}") for h in headers if key(h) != majority]
    report.warn(f"mixed {what}: kept {len(kept)} slices with {majority}, dropping {len(bad)}")
    return kept, bad


def _check_valid_fraction(
    folder: Path, n_expected: int, bad: list[tuple[str, str]], min_valid_fraction: float
) -> None:
    n_good = n_expected - len(bad)
    if n_expected == 0 or n_good <= 0 or n_good / n_expected < min_valid_fraction:
        first = quote_names([f"{name} ({reason})" for name, reason in bad])
        usable = f"only {max(n_good, 0)} of {n_expected} slice file(s) usable (need {min_valid_fraction:.0%})"
        raise DicomSeriesError(f"{usable}; bad: {first}", folder)




def _sort_superior_first(headers: list[SliceHeader], report: LoadReport) -> tuple[list[SliceHeader], np.ndarray]:
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


def _drop_duplicates(headers: list[SliceHeader], normal: np.ndarray, report: LoadReport) -> list[SliceHeader]:
    """Keep the first slice (in file-name order) at each position along the normal."""
    kept = [headers[0]]
    dropped = []
    for header in headers[1:]:
        if abs((kept[-1].position - header.position) @ normal) < _DUPLICATE_TOLERANCE_MM:  # type: ignore[operator]
            dropped.append(f"{header.name} (kept {kept[-1].name})")
        else:
            kept.append(header)
    if dropped:
        report.warn(f"dropped {len(dropped)} slice(s) at duplicate positions: {quote_names(dropped)}")
    return kept

"""Multi-frame files (Enhanced CT, Legacy Converted Enhanced CT): one file → one :class:`SliceHeader` per frame.

An Enhanced CT file holds a whole series. Its geometry and rescale live in functional groups: the
Shared Functional Groups Sequence holds what every frame has in common, the Per-frame Functional
Groups Sequence one item per frame for what varies (PS3.3 C.7.6.16). The groups read here:

* Plane Position (0020,9113) → ImagePositionPatient of the frame;
* Plane Orientation (0020,9116) → ImageOrientationPatient;
* Pixel Measures (0028,9110) → PixelSpacing, SpacingBetweenSlices / SliceThickness;
* Pixel Value Transformation (0028,9145) → RescaleSlope, RescaleIntercept (per frame when they vary).

A frame's group is looked up in its per-frame item first, then in the shared item, then among the
top-level attributes (legacy converted files and some exporters repeat them there). Each frame then
is a slice like any other: the series plan picks, checks and sorts frames exactly as it does files,
and the pixel pass decodes each frame into its row. Uncompressed frames get their own file offset;
compressed ones are cut from the encapsulated pixel data once per file and process.

Written by hand: pydicom parses the sequences but has no notion of a frame's geometry, and the
libraries that do (highdicom) would be a large dependency for four attribute look-ups.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom.headers import (
    NATIVE_LITTLE_ENDIAN,
    SliceHeader,
    _positive_float,
    valid_orientation,
    valid_position,
    valid_rescale,
    valid_spacing,
)

#: Largest frame count accepted (a corrupt NumberOfFrames would otherwise allocate absurd volumes).
MAX_FRAMES = 10_000


def is_multiframe(header: SliceHeader, ds: Dataset) -> bool:
    """Whether the file's slices are described per frame (several frames, or functional groups).

    Args:
        header: the file-level header.
        ds: the parsed dataset.
    """
    return header.has_pixel_data and (
        _number_of_frames(ds, header.path) > 1
        or "PerFrameFunctionalGroupsSequence" in ds
        or "SharedFunctionalGroupsSequence" in ds
    )


def _number_of_frames(ds: Dataset, path: Path) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise DicomSeriesError(f"NumberOfFrames {value!r} is not a number", path) from exc
    if not 1 <= frames <= MAX_FRAMES:
        raise DicomSeriesError(f"NumberOfFrames {frames} is outside 1..{MAX_FRAMES}", path)
    return frames


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    sequence = None if ds is None else ds.get(keyword)
    return sequence[0] if sequence else None


def _group_value(sources: tuple[Dataset | None, ...], group: str, keyword: str) -> object:
    """``keyword`` from the first source whose ``group`` sequence has it; None when none has."""
    for source in sources:
        item = _first_item(source, group)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def frame_headers(header: SliceHeader, ds: Dataset) -> list[SliceHeader]:
    """One header per frame of a multi-frame file, each with the frame's own geometry and rescale.

    Args:
        header: the file-level header (what the top-level attributes say).
        ds: the parsed dataset (pixel data deferred).

    Returns:
        The frames' headers in file order; a frame without a usable Plane Position has
        ``position=None`` (the plan leaves it out with that reason, as it does a single file).

    Raises:
        DicomSeriesError: a frame count that disagrees with the per-frame items or the pixel data,
            or a rescale that cannot give finite HU.
    """
    path = header.path
    n_frames = _number_of_frames(ds, path)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n_frames:
        raise DicomSeriesError(f"{len(per_frame)} per-frame functional group item(s) for {n_frames} frames", path)
    fmt = header.pixel_format
    frame_bytes = _native_frame_bytes(header)
    if frame_bytes is not None:
        element = ds.get_item("PixelData", keep_deferred=True)
        length = getattr(element, "length", None)
        if length is not None and length != 0xFFFFFFFF and length < n_frames * frame_bytes:
            raise DicomSeriesError(f"{length} bytes of pixel data for {n_frames} frames of {frame_bytes} bytes", path)

    headers = []
    for k in range(n_frames):
        sources = (per_frame[k] if per_frame else None, shared)
        position = valid_position(_group_value(sources, "PlanePositionSequence", "ImagePositionPatient"))
        if position is None and n_frames == 1:
            position = header.position
        orientation = valid_orientation(_group_value(sources, "PlaneOrientationSequence", "ImageOrientationPatient"))
        spacing = valid_spacing(_group_value(sources, "PixelMeasuresSequence", "PixelSpacing"))
        gap = _positive_float(_group_value(sources, "PixelMeasuresSequence", "SpacingBetweenSlices")) or \
            _positive_float(_group_value(sources, "PixelMeasuresSequence", "SliceThickness"))
        slope = _group_value(sources, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(sources, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None and intercept is None:
            rescale = (header.slope, header.intercept)
        else:
            rescale = valid_rescale(slope, intercept, path)
        offset = header.pixel_offset
        frame_format = fmt
        if frame_bytes is not None and offset is not None:
            # An uncompressed frame is a single-frame slice at its own offset: the fast reader applies.
            offset, frame_format = offset + k * frame_bytes, {**fmt, "number_of_frames": 1}
        headers.append(replace(
            header,
            position=position,
            orientation=orientation if orientation is not None else header.orientation,
            pixel_spacing=spacing or header.pixel_spacing,
            slope=rescale[0],
            intercept=rescale[1],
            slice_gap_hint=gap or header.slice_gap_hint,
            notes=header.notes if k == 0 else (),
            pixel_offset=offset,
            pixel_format=frame_format,
            frame=k,
        ))
    return headers


def _native_frame_bytes(header: SliceHeader) -> int | None:
    """Bytes of one uncompressed frame, None for compressed or unusual layouts (decoded by pydicom)."""
    fmt = header.pixel_format
    if UID(header.transfer_syntax) not in NATIVE_LITTLE_ENDIAN or not fmt:
        return None
    bits, rows, columns = fmt.get("bits_allocated"), fmt.get("rows"), fmt.get("columns")
    if bits not in (8, 16, 32) or not isinstance(rows, int) or not isinstance(columns, int):
        return None
    return rows * columns * bits // 8


def encapsulated_frame(header: SliceHeader) -> bytes:
    """The compressed frame ``header.frame`` of a multi-frame file, re-encapsulated as a one-frame value.

    The file's frames are cut from its encapsulated pixel data once per process and kept for the
    next frame (the pixel pass decodes a file's frames one after another).

    Args:
        header: a frame's header with ``pixel_offset`` at the file's encapsulated pixel data.
    """
    stat = os.stat(header.path)
    frames = _cut_frames(str(header.path), stat.st_mtime_ns, stat.st_size, header.pixel_offset,
                         int(header.pixel_format["number_of_frames"]))
    if header.frame is None or not 0 <= header.frame < len(frames):
        raise DicomSeriesError(f"frame {header.frame} of {len(frames)} not found in the pixel data", header.path)
    return encapsulate([frames[header.frame]])


@functools.lru_cache(maxsize=1)
def _cut_frames(path: str, mtime_ns: int, size: int, offset: int, n_frames: int) -> tuple[bytes, ...]:
    """Every frame's codestream of one file (cached by path, modification time and size)."""
    with open(path, "rb") as file:
        file.seek(offset)
        # To the end of the file: the value ends at its sequence delimiter, where pydicom stops.
        encapsulated = file.read()
    try:
        return tuple(generate_frames(encapsulated, number_of_frames=n_frames))
    except Exception as exc:  # noqa: BLE001 - a broken item structure of any kind
        raise DicomSeriesError(f"cannot split the pixel data into {n_frames} frames ({exc})", path) from exc

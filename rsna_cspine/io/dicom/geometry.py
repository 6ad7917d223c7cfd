"""Series geometry: slice step, gaps and tilt, file numbering, and the :class:`Volume` they describe."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from rsna_cspine.io.dicom.headers import SliceHeader
from rsna_cspine.io.dicom.report import LoadReport, quote_names
from rsna_cspine.io.volume import Volume, study_name

#: A step longer than this many times the median step is a gap (missing slices).
_GAP_FACTOR = 1.5
#: Angle between the slice normal and the slice-to-slice step above which a series counts as tilted.
_TILT_TOLERANCE_DEG = 0.1


def build_volume(
    hu: np.ndarray, headers: list[SliceHeader], normal: np.ndarray, folder: Path, report: LoadReport
) -> Volume:
    """The volume of decoded slices: spacing from the positions, orientation, file numbers, warnings.

    Args:
        hu: float32 ``(z, y, x)``, one row per header.
        headers: the slices, ordered superior → inferior.
        normal: unit slice normal pointing superior.
        folder: the series folder (the study UID when the headers lack one).
        report: the load's repairs so far; geometry notes are added.
    """
    positions = np.stack([h.position for h in headers]).astype(float)  # type: ignore[misc]
    orientation = headers[0].orientation
    assert orientation is not None
    pixel_spacing = headers[0].pixel_spacing
    if pixel_spacing is None:
        report.warn("no PixelSpacing: assuming 1 mm pixels")
        pixel_spacing = (1.0, 1.0)
    dz = _slice_step(positions, headers, normal, report)
    numbers = np.array([h.number for h in headers], dtype=np.int64)
    study_uids = Counter(h.study_uid for h in headers if h.study_uid)
    return Volume(
        hu=hu,
        spacing=(dz, pixel_spacing[0], pixel_spacing[1]),
        positions=positions,
        row_cosine=orientation[:3].astype(float),
        col_cosine=orientation[3:].astype(float),
        slice_numbers=numbers,
        files=[h.name for h in headers],
        reversed_numbering=_numbering_decreases(numbers, headers),
        study_uid=study_uids.most_common(1)[0][0] if study_uids else study_name(folder),
        warnings=report.messages,
    )


def _slice_step(positions: np.ndarray, headers: list[SliceHeader], normal: np.ndarray, report: LoadReport) -> float:
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
        listed = [f"{steps[i]:.3g} mm between z={i} ({headers[i].name}) and {headers[i + 1].name}"
                  for i in gaps]
        report.warn(f"non-uniform slices: {gaps.size} gap(s) (median step {dz:.3g} mm): {quote_names(listed)}")
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

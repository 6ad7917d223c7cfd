"""Anatomical quality control of stage 1, before any crop: is each labelled vertebra where and what a C1..C7 can be?

A vertebra the network labelled is kept only when

* its size fits its level: the height it spans along the scan axis and its volume lie in a generous
  millimetre range for that level (``LEVEL_LIMITS``);
* enough of it is in view: a vertebra that touches the first or last slice of the scan (or a face of
  the cascade's fine box inside the scan) is cut; it must still show ``min_in_view`` of its level's
  typical height, and one touching an in-plane face of the fine box is dropped (the box missed it);
  a vertebra on fewer than ``min_slices`` slices cannot be measured at all (a single slice's "height"
  is only the slice step, 20 mm in some real series);
* it sits on one column with its neighbours: C1..C7 in cranio-caudal order without gaps, consecutive
  centroids a plausible distance apart along the scan axis (absolutely, and relative to the study's
  own median step when there are enough of them) and in-plane, and no centroid far off the line
  through its neighbours. Of the runs of consecutive vertebrae linked this way, the longest (then the
  largest) is kept; the others are dropped, each with the reason its run was cut off.

A dropped vertebra is removed from the mask, so stage 2 never crops it and it takes the prior.

The limits come from adult anatomy, with wide margins, not from the phantoms:

* C3–C7 vertebral bodies are 11–16 mm tall, 15–20 mm wide and 15–17 mm deep (Panjabi MM et al.,
  *Spine* 1991;16:861–869; Gilad I, Nissan M, *Spine* 1986;11:154–157). A labelled vertebra also holds
  its articular pillars and its spinous process, which slopes down to the level below (C7's is the
  longest), so it spans about 18–26 mm along the scan axis; flexion of the neck by 30° lengthens that
  by up to half the vertebra's depth (55–70 mm at C7).
* C2 measures about 35–40 mm from the tip of the dens to its inferior endplate (Doherty BJ,
  Heggeness MH, *Spine* 1995;20:513–517); C1 is a ring whose lateral masses are about 15 mm tall
  (Doherty BJ, Heggeness MH, *Spine* 1994;19:2497–2500).
* Volumes follow from those sizes: a C3–C6 body is about 2.5–3 mL (an elliptic cylinder of the
  dimensions above) and the posterior elements add as much again, so a whole vertebra is about
  5–7 mL, C2 and C7 more. The ranges below allow a factor of about four either way; a lumbar or
  lower thoracic vertebra (35–60 mL; T12 cut to 34 mm already measures 45 mL in the TotalSegmentator
  example CT) is outside every one of them.
* Consecutive cervical centroids lie 15–25 mm apart along the spine (a body and a 4–6 mm disc),
  so 5–45 mm along the scan axis covers flexion and large necks; in-plane they drift with the
  lordosis and head tilt by a few millimetres per level (25 mm allowed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rsna_cspine.constants import VERTEBRAE

#: Columns the QC adds to the vertebra table.
QC_COLUMNS: tuple[str, ...] = ("height_mm", "volume_ml", "qc")
#: ``qc`` values other than a drop.
KEPT, ABSENT = "ok", "absent"
DROPPED = "dropped"


@dataclass(frozen=True)
class LevelLimits:
    """Plausible size of one vertebra level.

    Attributes:
        height_mm: span along the scan axis of a whole vertebra (low, high).
        volume_ml: its volume (low, high).
        typical_height_mm: the usual span; a cut vertebra must show ``min_in_view`` of it.
    """

    height_mm: tuple[float, float]
    volume_ml: tuple[float, float]
    typical_height_mm: float


#: Per level, from the anatomy cited in the module docstring (margins of about ×2 on heights, ×4 on volumes).
LEVEL_LIMITS: dict[str, LevelLimits] = {
    "C1": LevelLimits((6.0, 40.0), (1.0, 20.0), 15.0),
    "C2": LevelLimits((20.0, 65.0), (2.0, 30.0), 38.0),
    **{name: LevelLimits((8.0, 50.0), (1.0, 20.0), 20.0) for name in ("C3", "C4", "C5", "C6")},
    "C7": LevelLimits((10.0, 55.0), (1.5, 25.0), 24.0),
}


@dataclass(frozen=True)
class QCLimits:
    """Every threshold of the QC (see the module docstring for where they come from).

    Attributes:
        levels: size limits per vertebra.
        min_slices: slices a vertebra must span for its height to mean anything.
        min_in_view: share of the typical height a vertebra cut by the scan's (or the box's) edge must show.
        step_mm: distance of consecutive centroids along the scan axis (low, high).
        step_ratio: the same distance relative to the study's median step per level (the median over
            every pair of kept vertebrae of their distance over their level difference).
        min_steps: pairs needed before the relative rule applies.
        max_shift_mm: in-plane distance of consecutive centroids.
        max_bend_mm: in-plane distance of a centroid from the line through its two neighbours.
    """

    levels: dict[str, LevelLimits] = field(default_factory=lambda: dict(LEVEL_LIMITS))
    min_slices: int = 2
    min_in_view: float = 0.7
    step_mm: tuple[float, float] = (5.0, 45.0)
    step_ratio: tuple[float, float] = (0.4, 1.6)
    min_steps: int = 3
    max_shift_mm: float = 25.0
    max_bend_mm: float = 15.0


def _size_problem(name: str, height: float, volume: float, cut: bool, dz: float, limits: QCLimits) -> str:
    """Why one vertebra's size or coverage is implausible ('' when it is not).

    A height counted in slices is uncertain by one slice (the vertebra's ends fall anywhere inside its
    first and last slice), so each height limit is given one slice of slack.
    """
    slices = int(round(height / dz))
    if slices < limits.min_slices:
        return f"on {slices} slice{'s' if slices != 1 else ''} only, too few to measure it"
    level = limits.levels[name]
    low, high = level.height_mm
    if cut:
        needed = limits.min_in_view * level.typical_height_mm
        if height + dz < needed:
            return f"cut by the edge of the scan: {height:.0f} mm in view, needs {needed:.0f} of ~{level.typical_height_mm:.0f}"
    elif height + dz < low:
        return f"height {height:.0f} mm below {low:.0f}"
    if height - dz > high:
        return f"height {height:.0f} mm above {high:.0f}"
    v_low, v_high = level.volume_ml
    if not cut and volume < v_low:
        return f"volume {volume:.1f} mL below {v_low:.1f}"
    if volume > v_high:
        return f"volume {volume:.1f} mL above {v_high:.1f}"
    return ""


def _link_problem(upper: str, lower: str, step: float, shift: float, median: float | None, limits: QCLimits) -> str:
    """Why two vertebrae found one after the other are not neighbours on one column ('' when they are)."""
    if VERTEBRAE.index(lower) != VERTEBRAE.index(upper) + 1:
        return f"gap between {upper} and {lower}"
    low, high = limits.step_mm
    if step < 0:
        return f"{lower} {-step:.0f} mm above {upper} (out of order)"
    if step < low:
        return f"{lower} only {step:.0f} mm below {upper} (at least {low:.0f})"
    if step > high:
        return f"{lower} {step:.0f} mm below {upper} (at most {high:.0f})"
    if median is not None and not limits.step_ratio[0] <= step / median <= limits.step_ratio[1]:
        return f"{upper} to {lower} {step:.0f} mm, {step / median:.1f}× the study's median step"
    if shift > limits.max_shift_mm:
        return f"{lower} {shift:.0f} mm beside {upper} in-plane (at most {limits.max_shift_mm:.0f})"
    return ""


def check_vertebrae(
    table: pd.DataFrame,
    spacing: Sequence[float],
    shape: Sequence[int],
    box: tuple[Sequence[int], Sequence[int]] | None = None,
    limits: QCLimits | None = None,
) -> pd.DataFrame:
    """The vertebra table with ``height_mm``, ``volume_ml`` and the verdict ``qc`` of every vertebra.

    ``qc`` is ``ok`` (kept), ``absent`` (not found) or ``dropped: <reason>``.

    Args:
        table: one row per vertebra, C1..C7 (``masks.VERTEBRA_COLUMNS``; index bounds, centroids, counts).
        spacing: ``(dz, dy, dx)`` of the volume the table describes, in mm.
        shape: its ``(z, y, x)``.
        box: ``(start, size)`` in voxels of the region the network saw, when it was not the whole volume
            (the cascade's fine box); a vertebra touching one of its faces inside the volume is cut.
        limits: thresholds (default :class:`QCLimits`).
    """
    limits = limits or QCLimits()
    out = table.copy().reset_index(drop=True)
    dz, dy, dx = (float(s) for s in spacing)
    found = out["found"].astype(bool).to_numpy()
    heights = np.where(found, (out["z_max"].astype(float) - out["z_min"].astype(float) + 1) * dz, np.nan)
    volumes = np.where(found, out["voxel_count"].astype(float) * dz * dy * dx / 1000.0, np.nan)
    out["height_mm"], out["volume_ml"] = np.round(heights, 1), np.round(volumes, 2)
    verdicts = [KEPT if f else ABSENT for f in found]
    z_lo, z_hi = 0, int(shape[0]) - 1
    faces_in_plane: list[tuple[int, int, int]] = []  # (axis, low face, high face) of the box inside the volume
    if box is not None:
        start, size = box
        z_lo, z_hi = max(z_lo, int(start[0])), min(z_hi, int(start[0]) + int(size[0]) - 1)
        faces_in_plane = [(axis, int(start[axis]), int(start[axis]) + int(size[axis]) - 1) for axis in (1, 2)]

    for i in np.flatnonzero(found):
        row = out.loc[i]
        name = str(row["vertebra"])
        cut = int(row["z_min"]) <= z_lo or int(row["z_max"]) >= z_hi
        for axis, low_face, high_face in faces_in_plane:
            key, n = "yx"[axis - 1], int(shape[axis])
            lo, hi = int(row[f"{key}_min"]), int(row[f"{key}_max"])
            if (lo <= low_face and low_face > 0) or (hi >= high_face and high_face < n - 1):
                verdicts[i] = f"{DROPPED}: cut by the fine box in-plane (the localiser missed it)"
                break
        else:
            problem = _size_problem(name, float(heights[i]), float(volumes[i]), cut, dz, limits)
            if problem:
                verdicts[i] = f"{DROPPED}: {problem}"

    alive = [i for i in range(len(out)) if verdicts[i] == KEPT]
    centre = {i: np.array([out.loc[i, "centroid_z"] * dz, out.loc[i, "centroid_y"] * dy, out.loc[i, "centroid_x"] * dx],
                          dtype=np.float64) for i in alive}
    names = {i: str(out.loc[i, "vertebra"]) for i in alive}
    # Off the column: far from the line through both neighbours (only between two found neighbours). The
    # worst one goes first and the rest are judged again without it: a misplaced vertebra also pulls
    # the line its neighbours are measured against.
    while True:
        bends = {}
        for a, b, c in zip(alive, alive[1:], alive[2:]):
            if VERTEBRAE.index(names[a]) + 1 == VERTEBRAE.index(names[b]) == VERTEBRAE.index(names[c]) - 1:
                pa, pb, pc = centre[a], centre[b], centre[c]
                t = float(np.clip((pb[0] - pa[0]) / (pc[0] - pa[0]), 0.0, 1.0)) if pc[0] != pa[0] else 0.5
                bends[b] = (float(np.linalg.norm(pb[1:] - (pa[1:] + t * (pc[1:] - pa[1:])))), names[a], names[c])
        worst = max(bends, key=lambda i: bends[i][0], default=None)
        if worst is None or bends[worst][0] <= limits.max_bend_mm:
            break
        bend, above, below = bends[worst]
        verdicts[worst] = f"{DROPPED}: {bend:.0f} mm off the line through {above} and {below} (at most {limits.max_bend_mm:.0f})"
        alive.remove(worst)
    alive = [i for i in alive if verdicts[i] == KEPT]
    if alive:
        _keep_longest_run(alive, centre, names, out, verdicts, limits)
    out["qc"] = verdicts
    return out


def _keep_longest_run(alive: list[int], centre: dict[int, np.ndarray], names: dict[int, str], table: pd.DataFrame,
                      verdicts: list[str], limits: QCLimits) -> None:
    """Split the surviving vertebrae where consecutive ones are not neighbours; drop all runs but the best."""
    pairs = list(zip(alive, alive[1:]))
    # The study's own step per level: the median over every pair of survivors, so that one or two
    # misplaced labels (a swap, a label in the brain) do not shift it.
    level = {i: VERTEBRAE.index(names[i]) for i in alive}
    per_level = [(centre[b][0] - centre[a][0]) / (level[b] - level[a]) for k, a in enumerate(alive) for b in alive[k + 1:]]
    per_level = [step for step in per_level if step > 0]
    median = float(np.median(per_level)) if len(per_level) >= limits.min_steps else None
    links = [_link_problem(names[a], names[b], float(centre[b][0] - centre[a][0]),
                           float(np.linalg.norm(centre[b][1:] - centre[a][1:])), median, limits) for a, b in pairs]
    runs: list[list[int]] = [[alive[0]]]
    for (_, b), problem in zip(pairs, links):
        if problem:
            runs.append([b])
        else:
            runs[-1].append(b)
    best = max(range(len(runs)), key=lambda k: (len(runs[k]), float(table.loc[runs[k], "voxel_count"].astype(float).sum())))
    kept = runs[best]
    span = names[kept[0]] if len(kept) == 1 else f"{names[kept[0]]}-{names[kept[-1]]}"
    broken = [problem for problem in links if problem]  # broken[k] separates runs[k] and runs[k + 1]
    for k, run in enumerate(runs):
        if k == best:
            continue
        reason = broken[k] if k < best else broken[k - 1]  # the cut on the side facing the kept run
        for i in run:
            verdicts[i] = f"{DROPPED}: not on one column with {span}: {reason}"


def too_large(verdict: str) -> bool:
    """Whether a verdict of :func:`check_vertebrae` drops a vertebra for a height or volume above its
    level's range (a label spilling onto what is not that vertebra), not for being small, cut or off the
    column."""
    verdict = str(verdict)
    return verdict.startswith((f"{DROPPED}: height", f"{DROPPED}: volume")) and " above " in verdict


def kept_vertebrae(table: pd.DataFrame) -> list[str]:
    """The vertebrae the QC kept, in order."""
    return [str(v) for v, q in zip(table["vertebra"], table["qc"]) if q == KEPT]


def dropped_labels(table: pd.DataFrame) -> list[int]:
    """Label values (1..7) of the vertebrae the QC dropped."""
    return [VERTEBRAE.index(str(v)) + 1 for v, q in zip(table["vertebra"], table["qc"]) if str(q).startswith(DROPPED)]


def qc_summary(table: pd.DataFrame) -> str:
    """One line for a study: what was kept, what was absent, what was dropped and why.

    Args:
        table: a table with ``qc`` (from :func:`check_vertebrae`).
    """
    kept = kept_vertebrae(table)
    absent = [str(v) for v, q in zip(table["vertebra"], table["qc"]) if q == ABSENT]
    parts = [f"kept {','.join(kept) if kept else 'none'}"]
    if absent:
        parts.append(f"absent {','.join(absent)}")
    parts += [f"{v} {q}" for v, q in zip(table["vertebra"], table["qc"]) if str(q).startswith(DROPPED)]
    return "; ".join(parts)

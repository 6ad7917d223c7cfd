"""Body outline and the soft tissue around the spine: skin and fat over muscle, fat planes, vessels,
spinal canal, discs, couch.

The outline is a union of ellipses per slice: the scalp over the cranial vault, the face and neck
(shaped by the jaws and the spine's landmarks), the shoulders and chest, and the arms when they hang
beside the body. Structures follow the spinal centre line (local ``u``/``v`` frame of ``geometry``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsna_cspine.synth.geometry import StudyGrid, column_slices, ellipse
from rsna_cspine.synth.head import HeadPlan
from rsna_cspine.synth.skeleton import Skeleton
from rsna_cspine.synth.tissues import Painter, Tissue

#: Skin, fat and galea over the skull (mm at head scale 1).
SCALP_MM = 5.0


def body_ellipses(skeleton: Skeleton, head: HeadPlan | None, habitus: float,
                  arms: list[tuple[np.ndarray, ...]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                    float]]:
    """The outline as ``(u0, v0, a, b, fat_scale)`` per ellipse, each array ``(nz,)`` (mm, local frame).

    Args:
        skeleton: the study layout.
        head: the head plan (None: no head anatomy, the neck outline continues upwards).
        habitus: soft-tissue size factor.
        arms: extra outline ellipses ``(u0, v0, a, b)`` of the arms.
    """
    grid = skeleton.grid
    named = {v.name: v for v in skeleton.vertebrae}
    s = skeleton.params["scale"]
    k = s * habitus
    depth = grid.depth
    arm_gap = 135.0 if arms else 145.0  # the chest narrows below the shoulders; arms hang beside it
    marks = [(named["C4"].centre, 58 * k, 60 * k, 4 * k), (named["C7"].centre, 66 * k, 64 * k, 6 * k),
             (named["T1"].top, 120 * k, 76 * k, 6 * k), (named["T1"].bottom, (150 + 28 * habitus) * s, 84 * k, 4 * k),
             (named["T2"].bottom, (145 + 25 * habitus) * s, 88 * k, 2 * k),
             (named["T3"].centre, arm_gap * k, 88 * k, 0.0), (named["T4"].bottom + 30.0, arm_gap * k, 90 * k, 0.0)]
    out = []
    if head is not None:
        hs = head.scale * (0.9 + 0.1 * habitus)
        chin_front = head.mandible_v - 68.0
        face = [(70.0, 28, 24, -70), (45.0, 60, 50, -50), (22.0, 68, 64, -42), (0.0, 68, 86, -18),
                (head.occlusal, 64, 84, -16),
                (head.mandible_bottom, 60, (64.0 - chin_front) / 2, (64.0 + chin_front) / 2)]
        marks += [(skeleton.up(zu * head.scale), a * hs, b * hs, c * hs) for zu, a, b, c in face]
        # the vault under the scalp: a section of the cranial ellipsoid grown by the scalp
        zu = skeleton.up(depth) / head.scale
        section = np.sqrt(np.clip(1.0 - ((zu - head.zc) / (head.c + SCALP_MM)) ** 2, 0.0, 1.0))
        a = (head.a + SCALP_MM) * section * head.scale + 1e-3
        b = (head.b + SCALP_MM) * section * head.scale + 1e-3
        out.append((np.zeros_like(depth), np.full_like(depth, head.vc * head.scale), a, b, 0.5))
    else:
        marks.append((named["C1"].top - 40.0, 62 * k, 70 * k, -6 * k))
    marks.sort(key=lambda m: m[0])
    table = np.array(marks)
    low = [np.interp(depth, table[:, 0], table[:, i]) for i in (1, 2, 3)]
    out.append((np.zeros_like(depth), low[2], low[0], low[1], 1.0))
    out += [(u0, v0, a, b, 0.8) for u0, v0, a, b in arms]
    return out


def paint_body(painter: Painter, grid: StudyGrid, ellipses: list, fat_mm: float) -> np.ndarray:
    """Fat inside the union of the outline ellipses, muscle inside their inner ellipses (``fat_mm`` less,
    times each ellipse's fat scale). Returns the rows that hold body (for the couch)."""
    body_rows = np.zeros(grid.size, dtype=bool)
    y = (np.arange(grid.size) * grid.ps)[:, None]
    x = (np.arange(grid.size) * grid.ps)[None, :]
    for z in range(grid.nz):
        cos, sin = float(np.cos(grid.theta[z])), float(np.sin(grid.theta[z]))
        boxes = []
        for u0, v0, a, b, _ in ellipses:
            xc = grid.cx[z] + cos * u0[z] - sin * v0[z]
            yc = grid.cy[z] + sin * u0[z] + cos * v0[z]
            half = max(a[z], b[z])
            boxes.append((xc - half, xc + half, yc - half, yc + half))
        x0 = max(0, int(np.floor(min(b_[0] for b_ in boxes) / grid.ps)))
        x1 = min(grid.size, int(np.ceil(max(b_[1] for b_ in boxes) / grid.ps)) + 1)
        y0 = max(0, int(np.floor(min(b_[2] for b_ in boxes) / grid.ps)))
        y1 = min(grid.size, int(np.ceil(max(b_[3] for b_ in boxes) / grid.ps)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        dx, dy = x[:, x0:x1] - grid.cx[z], y[y0:y1] - grid.cy[z]
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        fat = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        muscle = np.zeros_like(fat)
        for u0, v0, a, b, fat_scale in ellipses:
            if a[z] < 0.5 or b[z] < 0.5:
                continue
            r2 = ellipse(u, v, u0[z], v0[z], a[z], b[z])
            inner = max(0.0, 1.0 - fat_scale * fat_mm / (0.5 * (a[z] + b[z]))) ** 2
            fat |= r2 <= 1.0
            muscle |= r2 <= inner
        window = (z, slice(y0, y1), slice(x0, x1))
        painter.fill(window, fat & ~muscle, Tissue.FAT)
        painter.fill(window, muscle, Tissue.MUSCLE)
        body_rows[y0:y1] |= fat.any(axis=1)
    return np.nonzero(body_rows)[0]


def paint_soft_tissue(painter: Painter, skeleton: Skeleton, ellipses: list, rng: np.random.Generator,
                      habitus: float) -> dict[str, Any]:
    """Outline, fat planes, great vessels, spinal canal, discs and couch, painted in place.

    Args:
        painter: the study's painter (starts as air).
        skeleton: study layout (landmarks, grid).
        ellipses: the outline, from :func:`body_ellipses`.
        rng: anatomy stream (consumed a fixed number of times).
        habitus: soft-tissue size factor.

    Returns:
        ``"shoulder_depth"`` (mm, where the scanner noise starts to rise) and ``"ay"`` (``(nz,)``
        antero-posterior semi-axis of the vertebral bodies per slice, for the airway).
    """
    u_ = rng.uniform
    grid = skeleton.grid
    vert = skeleton.vertebrae
    s = skeleton.params["scale"]
    fat_mm = u_(3.0, 9.0) * habitus**2
    jugular_r = (u_(4.0, 6.5) * s, u_(4.0, 6.5) * s)
    muscle_shift = u_(-8.0, 8.0)
    has_couch = rng.random() < 0.7
    couch_shell, couch_gap = u_(100.0, 300.0), u_(3.0, 12.0)
    disc_hu = [painter.values[Tissue.DISC] + u_(-15.0, 15.0) for _ in vert]
    vacuum = [(rng.random() < skeleton.params["benign_rate"] * 0.3, u_(400.0, 800.0)) for _ in vert]

    depth = grid.depth
    named = {v.name: v for v in vert}
    centres = np.array([v.centre for v in vert])

    def along(values: list[float]) -> np.ndarray:
        return np.interp(depth, centres, values).astype(np.float32)

    ax = along([v.ax if v.has_body else 10.0 * s for v in vert])
    ay = along([v.ay if v.has_body else 8.0 * s for v in vert])
    shoulder = named["C7"].bottom + 15.0 * s
    body_rows = paint_body(painter, grid, ellipses, fat_mm)
    _paint_muscle_planes(painter, grid, skeleton, muscle_shift, habitus)

    # Great vessels from the skull base down; vertebral arteries in the foramina transversaria (C6 → C1).
    below_base = grid.slices_between(skeleton.skull_base - 12.0 * skeleton.head_scale, grid.nz * grid.dz)
    vertebral_levels = grid.slices_between(named["C1"].centre, named["C6"].bottom)
    for side, jugular in ((1.0, jugular_r[0]), (-1.0, jugular_r[1])):
        for u0, v0, radius, tissue, levels in (
                (ax + 12 * s, -(ay + 2 * s), 3.2 * s, Tissue.ARTERY, below_base),
                (ax + 21 * s, -(ay - 1 * s), jugular, Tissue.VEIN, below_base),
                (ax + 5.2 * s, 0.15 * ay - 0.4 * s, 1.8 * s, Tissue.ARTERY, vertebral_levels)):
            for z, window, r2, _ in column_slices(grid, side * u0, v0, radius, radius, levels):
                painter.fill((z, *window), r2 <= 1.0, tissue)

    # Spinal canal: CSF around the cord, up to the foramen magnum (the brainstem continues above).
    canal = grid.slices_between(skeleton.skull_base - 6.0 * skeleton.head_scale, grid.nz * grid.dz)
    vc = along([v.canal_v for v in vert])
    cax = along([v.cax for v in vert])
    cay = along([v.cay for v in vert])
    for z, window, r2, _ in column_slices(grid, 0.0, vc, 0.95 * cax, 0.95 * cay, canal):
        painter.fill((z, *window), r2 <= 1.0, Tissue.CSF)
    for z, window, r2, _ in column_slices(grid, 0.0, vc + 0.5 * s, 0.45 * cax, 0.5 * cay, canal):
        painter.fill((z, *window), r2 <= 1.0, Tissue.CORD)

    _paint_discs(painter, grid, vert, disc_hu, vacuum)
    if has_couch and len(body_rows):
        _paint_couch(painter, grid, float(body_rows[-1]) * grid.ps + couch_gap, couch_shell)
    return {"shoulder_depth": float(shoulder), "ay": ay}


def _paint_muscle_planes(painter: Painter, grid: StudyGrid, skeleton: Skeleton, shift: float,
                         habitus: float) -> None:
    """Fat planes around the paraspinal muscles and the sternocleidomastoids, from C1 to C7."""
    named = {v.name: v for v in skeleton.vertebrae}
    s = skeleton.params["scale"]
    top, bottom = named["C1"].centre, named["C7"].bottom
    box = grid.box(top, bottom, (-75 * s * habitus, 75 * s * habitus), (-40 * s * habitus, 62 * s * habitus))
    if box is None:
        return
    u, v = grid.local(box)
    inside_neck = painter.is_(box.index, Tissue.MUSCLE)  # only repaint muscle
    paraspinal = np.sqrt(ellipse(u, v, 0.0, 30 * s * habitus, 38 * s * habitus, 26 * s * habitus))
    midline = np.abs(u) <= 0.6 * s
    k = s * habitus
    scm = np.sqrt(ellipse(np.abs(u), v, 46 * k, -12 * k, 11 * k, 7 * k))
    planes = (np.abs(paraspinal - 1.0) * 26 * s * habitus <= 0.7) | (
        midline & (paraspinal <= 1.0) & (v > 22 * s)) | (np.abs(scm - 1.0) * 8 * s * habitus <= 0.6)
    painter.fill(box.index, (scm < 1.0) & inside_neck, Tissue.MUSCLE, painter.values[Tissue.MUSCLE] + shift)
    painter.fill(box.index, planes & inside_neck, Tissue.FAT)


def _paint_discs(painter: Painter, grid: StudyGrid, vert: list, disc_hu: list[float],
                 vacuum: list[tuple[bool, float]]) -> None:
    for i, (upper, lower) in enumerate(zip(vert[:-1], vert[1:])):
        if lower.disc_above <= 0:
            continue
        mid = 0.5 * (upper.bottom + lower.top)
        a = 1.01 * 0.5 * (upper.ax + lower.ax)
        b = 1.01 * 0.5 * (upper.ay + lower.ay)
        theta = 0.5 * (upper.theta + lower.theta)
        box = grid.box(upper.bottom - 1.5, lower.top + 1.5, (-a - 1, a + 1), (-b - 1, b + 1), theta)
        if box is None:
            continue
        u, v = grid.local(box, theta)
        r = ellipse(u, v, 0.0, 0.0, a, b)
        h = grid.depth_from(box, mid)
        painter.fill(box.index, (r <= 1.0) & (np.abs(h) <= 0.5 * lower.disc_above + 1.5), Tissue.DISC, disc_hu[i])
        painter.fill(box.index, (r <= 0.25) & (np.abs(h) <= 0.5 * lower.disc_above), Tissue.DISC,
                     disc_hu[i] - 10.0)  # nucleus
        has_gas, gas = vacuum[i]
        if has_gas:  # vacuum phenomenon of a degenerated disc
            painter.fill(box.index, (ellipse(u, v, 0.0, 0.0, 0.4 * a, 0.25 * b) <= 1.0)
                         & (np.abs(h) <= max(0.6, 0.5 * grid.dz)), Tissue.AIR, -gas)


def _paint_couch(painter: Painter, grid: StudyGrid, top_mm: float, shell: float) -> None:
    """Patient couch under the body: two thin shells around a foam core, only where there is air."""
    x = np.arange(grid.size) * grid.ps
    y = np.arange(grid.size)[:, None] * grid.ps
    surface = top_mm - (x[None, :] - x.mean()) ** 2 / 1200.0
    depth_in = y - surface
    shells = ((depth_in >= 0) & (depth_in <= 2.5)) | ((depth_in >= 17.5) & (depth_in <= 20.0))
    foam = (depth_in > 2.5) & (depth_in < 17.5)
    rows = np.nonzero((shells | foam).any(axis=1))[0]
    if not len(rows):
        return
    block = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1))
    is_air = painter.is_(block, Tissue.AIR)
    for mask, value in ((shells, shell), (foam, -900.0)):
        painter.fill(block, mask[rows[0]: rows[-1] + 1][None], Tissue.COUCH, value, where=is_air)

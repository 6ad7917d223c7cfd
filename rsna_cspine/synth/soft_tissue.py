"""Everything around the bones: skin, fat, muscle, airway, vessels, spinal canal, discs, lungs, couch.

Structures follow the spinal centre line (local ``u``/``v`` frame of ``geometry``) and change with
depth through anatomical landmarks (head above C2, neck, shoulders below C7), interpolated per slice.
"""

from __future__ import annotations

import numpy as np

from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.geometry import StudyGrid, column_slices, ellipse
from rsna_cspine.synth.skeleton import Skeleton, rib_circle

AIR_HU = -1000.0


def paint_soft_tissue(hu: np.ndarray, skeleton: Skeleton, cfg: SynthConfig,
                      rng: np.random.Generator) -> dict[str, float]:
    """Paint the non-bony anatomy into ``hu`` (float32, filled with air) in place.

    Args:
        hu: ``(z, y, x)`` volume, modified in place.
        skeleton: study layout (landmarks, grid).
        cfg: generator settings (contrast share, body habitus range).
        rng: anatomy stream (consumed a fixed number of times).

    Returns:
        Study-level tissue parameters (e.g. ``"contrast"`` 0/1, ``"shoulder_depth"``).
    """
    u_ = rng.uniform
    grid = skeleton.grid
    vert = skeleton.vertebrae
    s = skeleton.params["scale"]
    habitus = u_(*cfg.body_habitus)
    muscle, fat, fat_mm = u_(35.0, 60.0), u_(-120.0, -80.0), u_(3.0, 9.0) * habitus**2
    contrast = rng.random() < cfg.contrast_fraction
    artery = u_(200.0, 350.0) if contrast else u_(38.0, 55.0)
    vein = u_(120.0, 200.0) if contrast else u_(35.0, 50.0)
    airway_scale = u_(0.75, 1.2)
    csf, cord = u_(0.0, 15.0), u_(25.0, 40.0)
    lung = u_(-870.0, -800.0)
    thyroid = u_(70.0, 110.0) + (40.0 if contrast else 0.0)
    cartilage = u_(60.0, 200.0)
    jugular_r = (u_(4.0, 6.5) * s, u_(4.0, 6.5) * s)
    lung_apex_offset = u_(0.0, 8.0)
    muscle_shift = u_(-8.0, 8.0)
    has_couch = rng.random() < 0.7
    couch_shell, couch_gap = u_(100.0, 300.0), u_(3.0, 12.0)
    disc_hu = [u_(60.0, 100.0) for _ in vert]
    vacuum = [(rng.random() < skeleton.params["benign_rate"] * 0.3, u_(400.0, 800.0)) for _ in vert]

    depth = grid.depth
    named = {v.name: v for v in vert}
    centres = np.array([v.centre for v in vert])

    def along(values: list[float]) -> np.ndarray:
        return np.interp(depth, centres, values).astype(np.float32)

    ax = along([v.ax if v.has_body else 10.0 * s for v in vert])
    ay = along([v.ay if v.has_body else 8.0 * s for v in vert])
    c7 = named["C7"]
    shoulder = c7.bottom + 15.0 * s

    # Skin, subcutaneous fat and muscle: one ellipse per slice, head above C2 → neck → shoulders.
    marks = np.array([0.0, named["C2"].centre, named["C4"].centre, c7.centre, shoulder, c7.bottom + 45 * s])
    marks = np.maximum.accumulate(marks + np.arange(len(marks)) * 1e-3)
    semi_u = np.interp(depth, marks, np.array([74, 66, 58, 64, 120, 175]) * habitus * s)
    semi_v = np.interp(depth, marks, np.array([95, 72, 60, 62, 80, 95]) * habitus * s)
    centre_v = np.interp(depth, marks, np.array([-22, -6, 4, 6, 10, 14]) * habitus * s)
    inner2 = (1.0 - fat_mm / (0.5 * (semi_u + semi_v))) ** 2
    hu.fill(AIR_HU)
    body_rows = np.zeros(grid.size, dtype=bool)
    # Slice by slice: the same arithmetic as one 3D broadcast, but on cache-sized arrays.
    for z, window, r2, _ in column_slices(grid, 0.0, centre_v, semi_u, semi_v):
        zone = hu[z][window]
        zone[r2 <= 1.0] = fat
        zone[r2 <= inner2[z]] = muscle
        body_rows[window[0]] |= (r2 <= 1.0).any(axis=1)
    body_rows = np.nonzero(body_rows)[0]

    _paint_lungs(hu, grid, vert, lung, lung_apex_offset, habitus, s)
    _paint_muscle_planes(hu, grid, skeleton, fat, muscle, muscle_shift, habitus)

    # Airway (pharynx → larynx → trachea) anterior to the prevertebral soft tissue.
    c_marks = [named[n].centre for n in ("C1", "C2", "C3", "C4", "C6")]
    prevert = np.interp(depth, c_marks[:2] + [named["C4"].centre, named["C6"].centre, c7.centre, shoulder],
                        np.array([6, 4, 5, 12, 14, 15]) * s)
    ra_u = np.interp(depth, [0.0] + c_marks[1:], np.array([16, 14, 12, 10.5, 8.5]) * s * airway_scale)
    ra_v = np.interp(depth, [0.0] + c_marks[1:], np.array([10, 8, 6, 8, 8.0]) * s * airway_scale)
    va = -(ay + prevert + ra_v)

    # Thyroid lobes beside the trachea (C6–T1).
    lobes = grid.slices_between(named["C6"].centre, shoulder + 10 * s)
    for side in (1.0, -1.0):
        lobe = column_slices(grid, side * (ra_u + 9 * s), va - 1 * s, 6.5 * s, 9.0 * s, lobes)
        for z, window, r2, _ in lobe:
            hu[z][window][r2 <= 1.0] = thyroid

    # Great vessels; vertebral arteries run through the foramina transversaria (C6 → C1).
    vertebral_levels = grid.slices_between(named["C1"].centre, named["C6"].bottom)
    for side, jugular in ((1.0, jugular_r[0]), (-1.0, jugular_r[1])):
        for u0, v0, radius, value, levels in (
                (ax + 12 * s, -(ay + 2 * s), 3.2 * s, artery, None),
                (ax + 21 * s, -(ay - 1 * s), jugular, vein, None),
                (ax + 5.2 * s, 0.15 * ay - 0.4 * s, 1.8 * s, artery, vertebral_levels)):
            for z, window, r2, _ in column_slices(grid, side * u0, v0, radius, radius, levels):
                hu[z][window][r2 <= 1.0] = value

    # Airway: pharynx → larynx → trachea (with its cartilage rings below C6).
    trachea_from = named["C6"].centre
    ring = 1.0 + 1.8 * s / ra_u
    for z, window, r2, v in column_slices(grid, 0.0, va, ra_u, ra_v, reach=float(ring.max())):
        zone = hu[z][window]
        if grid.depth[z] > trachea_from:
            zone[(r2 > 1.0) & (r2 <= ring[z] ** 2) & (v < va[z] + 0.5 * ra_v[z])] = cartilage
        zone[r2 <= 1.0] = AIR_HU

    # Spinal canal: CSF around the cord.
    vc = along([v.canal_v for v in vert])
    cax = along([v.cax for v in vert])
    cay = along([v.cay for v in vert])
    for z, window, r2, _ in column_slices(grid, 0.0, vc, 0.95 * cax, 0.95 * cay):
        hu[z][window][r2 <= 1.0] = csf
    for z, window, r2, _ in column_slices(grid, 0.0, vc + 0.5 * s, 0.45 * cax, 0.5 * cay):
        hu[z][window][r2 <= 1.0] = cord

    _paint_discs(hu, grid, vert, disc_hu, vacuum)

    if has_couch and len(body_rows):
        _paint_couch(hu, grid, float(body_rows[-1]) * grid.ps + couch_gap, couch_shell)
    return {"contrast": float(contrast), "shoulder_depth": float(shoulder), "habitus": habitus}


def _paint_lungs(hu: np.ndarray, grid: StudyGrid, vert: list, lung: float, apex_offset: float,
                 habitus: float, s: float) -> None:
    """Lung apices from just above T1 down, inside each level's rib circle (see ``rib_circle``)."""
    thoracic = [v for v in vert if v.kind == "T"]
    if not thoracic:
        return
    apex = thoracic[0].top - apex_offset
    circles = np.array([rib_circle(v) for v in thoracic])
    centres = [v.centre for v in thoracic]
    reach_u = float((circles[:, 0] + circles[:, 2]).max())
    v_range = (float((circles[:, 1] - circles[:, 2]).min()), float((circles[:, 1] + circles[:, 2]).max()))
    box = grid.box(apex, grid.nz * grid.dz, (-reach_u, reach_u), v_range)
    if box is None:
        return
    depth = grid.depth[box.z]
    centre_u = np.interp(depth, centres, circles[:, 0]).astype(np.float32)[:, None, None]
    centre_v = np.interp(depth, centres, circles[:, 1]).astype(np.float32)[:, None, None]
    room = np.interp(depth, centres, circles[:, 2] - 6.0 * s)
    grow = np.sqrt(np.clip((depth - apex) / 45.0, 0.0, 1.0))
    radius = (np.maximum(room * np.minimum(1.0, 0.8 * habitus) * grow, 0.0) + 1e-3).astype(np.float32)
    u, v = grid.local(box)
    inside = ellipse(np.abs(u), v, centre_u, centre_v, radius[:, None, None], radius[:, None, None]) <= 1.0
    zone = hu[box.index]
    zone[inside & (zone > -900)] = lung


def _paint_muscle_planes(hu: np.ndarray, grid: StudyGrid, skeleton: Skeleton, fat: float, muscle: float,
                         shift: float, habitus: float) -> None:
    """Fat planes around the paraspinal muscles and the sternocleidomastoids, from C1 to C7."""
    named = {v.name: v for v in skeleton.vertebrae}
    s = skeleton.params["scale"]
    top, bottom = named["C1"].centre, named["C7"].bottom
    box = grid.box(top, bottom, (-75 * s * habitus, 75 * s * habitus), (-40 * s * habitus, 62 * s * habitus))
    if box is None:
        return
    u, v = grid.local(box)
    zone = hu[box.index]
    inside_neck = zone > fat + 5  # only repaint muscle, never air, fat or vessels' surroundings
    paraspinal = np.sqrt(ellipse(u, v, 0.0, 30 * s * habitus, 38 * s * habitus, 26 * s * habitus))
    midline = np.abs(u) <= 0.6 * s
    k = s * habitus
    scm = np.sqrt(ellipse(np.abs(u), v, 46 * k, -12 * k, 11 * k, 7 * k))
    planes = (np.abs(paraspinal - 1.0) * 26 * s * habitus <= 0.7) | (
        midline & (paraspinal <= 1.0) & (v > 22 * s)) | (np.abs(scm - 1.0) * 8 * s * habitus <= 0.6)
    zone[(scm < 1.0) & inside_neck] = muscle + shift
    zone[planes & inside_neck & (zone < 150)] = fat


def _paint_discs(hu: np.ndarray, grid: StudyGrid, vert: list, disc_hu: list[float],
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
        zone = hu[box.index]
        zone[(r <= 1.0) & (np.abs(h) <= 0.5 * lower.disc_above + 1.5)] = disc_hu[i]
        zone[(r <= 0.25) & (np.abs(h) <= 0.5 * lower.disc_above)] = disc_hu[i] - 10.0  # nucleus
        has_gas, gas = vacuum[i]
        if has_gas:  # vacuum phenomenon of a degenerated disc
            zone[(ellipse(u, v, 0.0, 0.0, 0.4 * a, 0.25 * b) <= 1.0)
                 & (np.abs(h) <= max(0.6, 0.5 * grid.dz))] = -gas


def _paint_couch(hu: np.ndarray, grid: StudyGrid, top_mm: float, shell: float) -> None:
    """Patient couch under the neck: two thin shells around a foam core, only where there is air."""
    x = np.arange(grid.size) * grid.ps
    y = np.arange(grid.size)[:, None] * grid.ps
    surface = top_mm - (x[None, :] - x.mean()) ** 2 / 1200.0
    depth_in = y - surface
    shells = ((depth_in >= 0) & (depth_in <= 2.5)) | ((depth_in >= 17.5) & (depth_in <= 20.0))
    foam = (depth_in > 2.5) & (depth_in < 17.5)
    for mask, value in ((shells, shell), (foam, -900.0)):
        if mask.any():
            region = hu[:, mask]
            hu[:, mask] = np.where(region <= AIR_HU + 1, value, region)

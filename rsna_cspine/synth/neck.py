"""The visceral neck: pharynx → larynx → trachea, hyoid, laryngeal cartilages, oesophagus and thyroid.

Vertebral levels of an adult in a neutral neck (Standring S, ed., *Gray's Anatomy*, 41st ed., 2016;
Moore KL et al., *Clinically Oriented Anatomy*, 7th ed., 2014): the nasopharynx lies in front of the
clivus and C1 under the sphenoid, the oropharynx in front of C2–C3; the hyoid body at C3 (C3–C4);
the thyroid cartilage at C4–C5 with the vocal folds at C5; the cricoid cartilage at C6, where the
larynx becomes the trachea and the pharynx the oesophagus, which runs down behind the trachea,
slightly to the left; the thyroid lobes beside the trachea from C5 to T1. HU per tissue: ``tissues``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna_cspine.synth.bone import paint_rod
from rsna_cspine.synth.geometry import StudyGrid, column_slices
from rsna_cspine.synth.skeleton import Skeleton
from rsna_cspine.synth.tissues import Painter, Tissue


@dataclass
class Airway:
    """Per-slice airway ellipse in the local frame: centre ``(0, v)``, semi-axes ``(a, b)`` (mm), painted
    from slice ``first`` down."""

    v: np.ndarray
    a: np.ndarray
    b: np.ndarray
    first: int


def airway(skeleton: Skeleton, airway_scale: float, ay: np.ndarray) -> Airway:
    """Lay the airway out in front of the prevertebral soft tissue.

    Args:
        skeleton: the study layout.
        airway_scale: calibre factor of the study's airway.
        ay: ``(nz,)`` antero-posterior semi-axis of the vertebral bodies per slice.
    """
    grid = skeleton.grid
    named = {v.name: v for v in skeleton.vertebrae}
    s = skeleton.params["scale"]
    hs = skeleton.head_scale
    top = named["C1"].top - 24.0 * hs  # roof of the nasopharynx, under the sphenoid
    marks = [top, named["C1"].top - 10.0 * hs, named["C1"].centre, named["C2"].centre, named["C3"].centre,
             named["C4"].centre, named["C5"].centre, named["C6"].centre, named["C7"].bottom + 15.0 * s]
    depth = grid.depth
    # prevertebral soft tissue: adenoids/longus capitis over C1, thin over C2–C4, oesophagus below C5
    prevert = np.interp(depth, marks, np.array([16, 10, 6, 4, 4.5, 5, 9, 12, 15]) * s)
    a = np.interp(depth, marks, np.array([12, 14, 14, 13, 12, 10.5, 6, 8.5, 8.5]) * s * airway_scale)
    b = np.interp(depth, marks, np.array([6, 8, 9, 8, 6, 8, 5, 8, 8]) * s * airway_scale)
    v = -(ay + prevert + b)
    first = int(np.searchsorted(depth, top))
    return Airway(v=v.astype(np.float32), a=a.astype(np.float32), b=b.astype(np.float32), first=first)


def paint_neck(painter: Painter, skeleton: Skeleton, way: Airway, rng: np.random.Generator) -> None:
    """Airway (with tracheal rings), larynx, hyoid, oesophagus and thyroid lobes.

    Args:
        painter: the study's painter.
        skeleton: the study layout.
        way: from :func:`airway`.
        rng: anatomy stream (consumed a fixed number of times).
    """
    grid = skeleton.grid
    named = {v.name: v for v in skeleton.vertebrae}
    s = skeleton.params["scale"]
    u_ = rng.uniform
    calcified = u_(0.0, 1.0)  # laryngeal cartilage ossifies with age
    hyoid_drop = u_(0.0, 8.0) * s
    oesophagus_air = rng.random() < 0.5
    hyoid_density = (u_(250.0, 450.0), u_(800.0, 1300.0))
    seed = int(rng.integers(0, 2**62))
    zs = slice(way.first, grid.nz)

    # Thyroid lobes beside the trachea (C5–T1), oesophagus behind it (from C6), slightly left.
    lobes = grid.slices_between(named["C5"].centre, named["T1"].bottom)
    for side in (1.0, -1.0):
        for z, window, r2, _ in column_slices(grid, side * (way.a + 9 * s), way.v - 1 * s, 6.5 * s, 9.0 * s, lobes):
            painter.fill((z, *window), r2 <= 1.0, Tissue.THYROID)
    gullet = grid.slices_between(named["C6"].centre, grid.nz * grid.dz)
    v_oes = way.v + way.b + 6.0 * s
    for z, window, r2, _ in column_slices(grid, 5.0 * s, v_oes, 9.0 * s, 6.0 * s, gullet, reach=1.4):
        painter.fill((z, *window), r2 <= 1.6, Tissue.FAT)  # the fat plane around it shows its wall
        painter.fill((z, *window), r2 <= 1.0, Tissue.MUSCLE)
        if oesophagus_air:
            painter.fill((z, *window), r2 <= 0.06, Tissue.AIR)

    # Larynx: thyroid cartilage (C4–C5), cricoid (C6), tracheal rings below; then the air column.
    thyroid_top, thyroid_bottom = named["C4"].top, named["C5"].bottom
    cricoid_top, cricoid_bottom = named["C6"].top - 2.0 * s, named["C6"].bottom + 2.0 * s
    trachea_from = named["C6"].bottom + 3.0 * s
    ring = 1.0 + 2.2 * s / way.a
    for z, window, r2, v in column_slices(grid, 0.0, way.v, way.a, way.b, zs, reach=2.2):
        d = grid.depth[z]
        u = _window_u(grid, z, window)
        posterior = v > way.v[z]
        if thyroid_top <= d <= thyroid_bottom:
            apex_v = way.v[z] - way.b[z] - 7.0 * s
            half_width = way.a[z] + 10.0 * s
            # two laminae meeting in front (the laryngeal prominence), open behind
            lamina = np.abs(np.abs(u) * (way.b[z] + 9.0 * s) / half_width - (v - apex_v)) <= 1.4 * s
            lamina &= (v <= way.v[z] + 2.0 * s) & (np.abs(u) <= half_width)
            painter.fill((z, *window), lamina, Tissue.CARTILAGE)
            painter.fill((z, *window), lamina & (_speckle(seed, z, r2.shape) < calcified - 0.4), Tissue.BONE,
                         hyoid_density[1] * 0.5)
        if cricoid_top <= d <= cricoid_bottom:  # a signet ring: tall lamina behind, low arch in front
            band = (r2 > 1.1) & (r2 <= (1.0 + 3.0 * s / way.a[z]) ** 2)
            painter.fill((z, *window), band & (posterior | (d > cricoid_bottom - 6.0 * s)), Tissue.CARTILAGE)
        if d > trachea_from:
            painter.fill((z, *window), (r2 > 1.0) & (r2 <= ring[z] ** 2) & (v < way.v[z] + 0.5 * way.b[z]),
                         Tissue.CARTILAGE)
        painter.fill((z, *window), r2 <= 1.0, Tissue.AIR)

    # Hyoid: a U of bone in front of the epiglottis at C3 (C3–C4), greater horns running back and up.
    depth = named["C3"].bottom + hyoid_drop
    k = int(np.clip(np.searchsorted(grid.depth, depth), 0, grid.nz - 1))
    vh = float(way.v[k] - way.b[k]) - 14.0 * s
    body = np.array([[-13.0 * s, vh], [13.0 * s, vh]])
    paint_rod(painter, grid, np.linspace(depth, depth, 9), np.linspace(body[0, 0], body[1, 0], 9),
              np.full(9, vh), 3.5 * s, hyoid_density, 1.0)
    for side in (1.0, -1.0):
        horn_u = side * np.linspace(12.0 * s, 24.0 * s, 12)
        horn_v = np.linspace(vh + 2.0 * s, vh + 26.0 * s, 12)
        paint_rod(painter, grid, np.linspace(depth, depth - 6.0 * s, 12), horn_u, horn_v, 2.3 * s,
                  hyoid_density, 0.8)


def _window_u(grid: StudyGrid, z: int, window: tuple[slice, slice]) -> np.ndarray:
    """Local u (mm) of a slice window (``column_slices`` yields only v)."""
    rows, cols = window
    x = (np.arange(cols.start, cols.stop) * grid.ps - grid.cx[z])[None, :]
    y = (np.arange(rows.start, rows.stop) * grid.ps - grid.cy[z])[:, None]
    return np.cos(grid.theta[z]) * x + np.sin(grid.theta[z]) * y


def _speckle(seed: int, z: int, shape: tuple[int, int]) -> np.ndarray:
    """Uniform noise of a slice window, fixed by (seed, slice): patchy ossification."""
    return np.random.default_rng((seed, z)).random(shape)

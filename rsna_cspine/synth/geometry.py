"""The phantom's voxel grid and the spine-following local coordinates every shape is written in.

Image coordinates are millimetres ``x = column × spacing`` and ``y = row × spacing`` (rows run
anterior → posterior, columns patient right → left, as in an axial DICOM). Depth is the distance in mm
below the top of the volume, slice ``z`` sitting at ``(z + 0.5) × dz``. Anatomy is described in a
local frame that follows the spine: ``u`` (patient left) and ``v`` (posterior) in mm from the spinal
centre line of each slice, rotated by the slice's axial rotation. Describing shapes in mm and only
sampling them on the grid keeps the anatomy the same at every matrix size and spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A sub-block of the volume: slices ``z``, rows ``y``, columns ``x``."""

    z: slice
    y: slice
    x: slice

    @property
    def index(self) -> tuple[slice, slice, slice]:
        return (self.z, self.y, self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.stop - self.z.start, self.y.stop - self.y.start, self.x.stop - self.x.start)


@dataclass
class StudyGrid:
    """Sampling grid of one study plus its spinal centre line.

    Attributes:
        nz: number of slices.
        size: in-plane matrix size.
        dz: slice spacing (mm).
        ps: in-plane pixel spacing (mm).
        cx: ``(nz,)`` x of the spinal centre line per slice (image mm).
        cy: ``(nz,)`` y of the spinal centre line per slice (image mm).
        theta: ``(nz,)`` axial rotation of the local frame per slice (radians).
    """

    nz: int
    size: int
    dz: float
    ps: float
    cx: np.ndarray
    cy: np.ndarray
    theta: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nz, self.size, self.size)

    @property
    def depth(self) -> np.ndarray:
        """Depth (mm below the top of the volume) of each slice centre."""
        return (np.arange(self.nz) + 0.5) * self.dz

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.dz, self.ps, self.ps)

    def slices_between(self, top: float, bottom: float) -> slice:
        """Slices whose centre lies in ``[top, bottom]`` mm depth, widened by one slice each side."""
        start = max(0, int(np.floor(top / self.dz - 0.5)))
        stop = min(self.nz, int(np.ceil(bottom / self.dz - 0.5)) + 1)
        return slice(start, max(start, stop))

    def box(self, top: float, bottom: float, u_range: tuple[float, float], v_range: tuple[float, float],
            theta_extra: float = 0.0) -> Box | None:
        """Smallest grid block holding the local rectangle ``u_range × v_range`` over a depth range.

        Args:
            top: upper depth (mm).
            bottom: lower depth (mm).
            u_range: local ``(u_min, u_max)`` in mm.
            v_range: local ``(v_min, v_max)`` in mm.
            theta_extra: rotation added to the slices' own (a vertebra's own twist).

        Returns:
            The block, or None when it misses the volume.
        """
        zs = self.slices_between(top, bottom)
        if zs.stop <= zs.start:
            return None
        corners_u = np.array([u_range[0], u_range[0], u_range[1], u_range[1]])
        corners_v = np.array([v_range[0], v_range[1], v_range[0], v_range[1]])
        theta = self.theta[zs][:, None] + theta_extra
        cos, sin = np.cos(theta), np.sin(theta)
        xs = self.cx[zs][:, None] + cos * corners_u - sin * corners_v
        ys = self.cy[zs][:, None] + sin * corners_u + cos * corners_v
        x0 = max(0, int(np.floor(xs.min() / self.ps)) - 1)
        x1 = min(self.size, int(np.ceil(xs.max() / self.ps)) + 2)
        y0 = max(0, int(np.floor(ys.min() / self.ps)) - 1)
        y1 = min(self.size, int(np.ceil(ys.max() / self.ps)) + 2)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(zs, slice(y0, y1), slice(x0, x1))

    def full_box(self) -> Box:
        return Box(slice(0, self.nz), slice(0, self.size), slice(0, self.size))

    def local(self, box: Box, theta_extra: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Local ``(u, v)`` mm of every voxel of ``box``, float32 arrays of the box's shape."""
        x = (np.arange(box.x.start, box.x.stop, dtype=np.float32) * np.float32(self.ps))[None, None, :]
        y = (np.arange(box.y.start, box.y.stop, dtype=np.float32) * np.float32(self.ps))[None, :, None]
        dx = x - self.cx[box.z].astype(np.float32)[:, None, None]
        dy = y - self.cy[box.z].astype(np.float32)[:, None, None]
        theta = self.theta[box.z] + theta_extra
        cos = np.cos(theta).astype(np.float32)[:, None, None]
        sin = np.sin(theta).astype(np.float32)[:, None, None]
        return cos * dx + sin * dy, cos * dy - sin * dx

    def depth_from(self, box: Box, centre: float) -> np.ndarray:
        """``(z, 1, 1)`` depth of the box's slices relative to ``centre`` (positive = inferior)."""
        return (self.depth[box.z] - centre).astype(np.float32)[:, None, None]

    def physical(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable ``(z, y, x)`` mm coordinates of the box voxels (isotropic distances)."""
        z = (np.arange(box.shape[0], dtype=np.float32) * np.float32(self.dz))[:, None, None]
        y = (np.arange(box.shape[1], dtype=np.float32) * np.float32(self.ps))[None, :, None]
        x = (np.arange(box.shape[2], dtype=np.float32) * np.float32(self.ps))[None, None, :]
        return z, y, x


def ellipse(u: np.ndarray, v: np.ndarray, u0: float, v0: float, a: float, b: float) -> np.ndarray:
    """Normalised squared radius of ``(u, v)`` in the ellipse centred at ``(u0, v0)``; ≤ 1 is inside."""
    return ((u - u0) / a) ** 2 + ((v - v0) / b) ** 2


def segment_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane distance from ``(u, v)`` to a polyline, and the arc length of the nearest point.

    Args:
        u: local u (mm).
        v: local v (mm), broadcastable with ``u``.
        points: ``(n, 2)`` polyline vertices ``(u, v)``.

    Returns:
        ``(distance, arc_length)`` arrays.
    """
    best2 = None
    arc = None
    start_length = 0.0
    for (ua, va), (ub, vb) in zip(points[:-1], points[1:]):
        du, dv = np.float32(ub - ua), np.float32(vb - va)
        length2 = float(du * du + dv * dv)
        pu, pv = u - np.float32(ua), v - np.float32(va)
        t = np.clip((pu * du + pv * dv) * np.float32(1.0 / length2), 0.0, 1.0)
        dist2 = (pu - t * du) ** 2 + (pv - t * dv) ** 2
        along = t * np.float32(np.sqrt(length2)) + np.float32(start_length)
        if best2 is None:
            best2, arc = dist2, along
        else:
            closer = dist2 < best2
            np.copyto(best2, dist2, where=closer)
            np.copyto(arc, along, where=closer)
        start_length += float(np.sqrt(length2))
    return np.sqrt(best2), arc


def resample_path(points: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``step`` mm along a polyline, and their arc length from the first vertex.

    Args:
        points: ``(n, k)`` vertices.
        step: spacing of the output points (mm).

    Returns:
        ``(samples (m, k), arc_length (m,))``.
    """
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    arc = np.linspace(0.0, cumulative[-1], max(2, int(np.ceil(cumulative[-1] / step)) + 1))
    samples = np.stack([np.interp(arc, cumulative, points[:, k]) for k in range(points.shape[1])], axis=1)
    return samples, arc


def tube_field(grid: StudyGrid, depth: np.ndarray, u: np.ndarray, v: np.ndarray, radius: float,
               radius_z: float, theta_extra: float = 0.0) -> tuple[Box, np.ndarray] | None:
    """Normalised distance to a tube of ellipsoids strung along a 3D centre line (≤ 1 is inside).

    Long thin bones (ribs, clavicles) cross large empty regions: evaluating them voxel by voxel over
    their bounding block cost seconds at 512 px, while rasterising small ellipsoids along the centre
    line touches only the voxels near the bone. Centre points must be closer than ``radius``.

    Args:
        grid: study grid.
        depth: ``(n,)`` depth (mm) of the centre points.
        u: ``(n,)`` local u (mm) of the centre points.
        v: ``(n,)`` local v (mm).
        radius: in-plane radius (mm).
        radius_z: radius along the slice direction (mm).
        theta_extra: twist added to the slices' own rotation.

    Returns:
        ``(box, rho)`` with ``rho`` the smallest normalised ellipsoid radius per voxel (inf far away),
        or None when the tube misses the volume.
    """
    depth_axis = grid.depth
    theta = np.interp(depth, depth_axis, grid.theta) + theta_extra
    x = np.interp(depth, depth_axis, grid.cx) + np.cos(theta) * u - np.sin(theta) * v
    y = np.interp(depth, depth_axis, grid.cy) + np.sin(theta) * u + np.cos(theta) * v
    z_lo = np.clip(np.ceil((depth - radius_z) / grid.dz - 0.5), 0, grid.nz).astype(int)
    z_hi = np.clip(np.floor((depth + radius_z) / grid.dz - 0.5) + 1, 0, grid.nz).astype(int)
    y_lo = np.clip(np.ceil((y - radius) / grid.ps), 0, grid.size).astype(int)
    y_hi = np.clip(np.floor((y + radius) / grid.ps) + 1, 0, grid.size).astype(int)
    x_lo = np.clip(np.ceil((x - radius) / grid.ps), 0, grid.size).astype(int)
    x_hi = np.clip(np.floor((x + radius) / grid.ps) + 1, 0, grid.size).astype(int)
    hit = (z_hi > z_lo) & (y_hi > y_lo) & (x_hi > x_lo)
    if not hit.any():
        return None
    box = Box(slice(int(z_lo[hit].min()), int(z_hi[hit].max())),
              slice(int(y_lo[hit].min()), int(y_hi[hit].max())),
              slice(int(x_lo[hit].min()), int(x_hi[hit].max())))
    rho = np.full(box.shape, np.inf, dtype=np.float32)
    for i in np.nonzero(hit)[0]:
        zz = ((np.arange(z_lo[i], z_hi[i]) + 0.5) * grid.dz - depth[i]) / radius_z
        yy = (np.arange(y_lo[i], y_hi[i]) * grid.ps - y[i]) / radius
        xx = (np.arange(x_lo[i], x_hi[i]) * grid.ps - x[i]) / radius
        local = np.sqrt(zz[:, None, None] ** 2 + yy[None, :, None] ** 2 + xx[None, None, :] ** 2)
        view = rho[z_lo[i] - box.z.start: z_hi[i] - box.z.start, y_lo[i] - box.y.start: y_hi[i] - box.y.start,
                   x_lo[i] - box.x.start: x_hi[i] - box.x.start]
        np.minimum(view, local.astype(np.float32), out=view)
    return box, rho


def column_slices(grid: StudyGrid, u0: np.ndarray | float, v0: np.ndarray | float, a: np.ndarray | float,
                  b: np.ndarray | float, zs: slice | None = None, reach: float = 1.0):
    """Per slice, the small window around an ellipse ``(u0, v0, a, b)`` that follows the spine.

    Vessels, airway and canal are thin columns through the whole scan: evaluating them on their
    bounding block (which the spine's curve makes wide) cost most of the time at 512 px.

    Args:
        grid: study grid.
        u0: centre u (mm), scalar or ``(nz,)``.
        v0: centre v (mm), scalar or ``(nz,)``.
        a: semi-axis along u (mm), scalar or ``(nz,)``.
        b: semi-axis along v (mm), scalar or ``(nz,)``.
        zs: slices to visit (default all).
        reach: window half-size in units of the larger semi-axis (> 1 to see around the ellipse).

    Yields:
        ``(z, (rows, cols), r2, v)``: slice, window, normalised squared radius and local v (2D arrays).
    """
    n = grid.nz
    u0, v0, a, b = (np.broadcast_to(np.asarray(p, dtype=float), (n,)) for p in (u0, v0, a, b))
    zs = zs or slice(0, n)
    for z in range(zs.start, zs.stop):
        cos, sin = float(np.cos(grid.theta[z])), float(np.sin(grid.theta[z]))
        xc = grid.cx[z] + cos * u0[z] - sin * v0[z]
        yc = grid.cy[z] + sin * u0[z] + cos * v0[z]
        half = reach * max(a[z], b[z])
        x0 = max(0, int(np.floor((xc - half) / grid.ps)))
        x1 = min(grid.size, int(np.ceil((xc + half) / grid.ps)) + 1)
        y0 = max(0, int(np.floor((yc - half) / grid.ps)))
        y1 = min(grid.size, int(np.ceil((yc + half) / grid.ps)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        x = (np.arange(x0, x1) * grid.ps - grid.cx[z])[None, :]
        y = (np.arange(y0, y1) * grid.ps - grid.cy[z])[:, None]
        u = cos * x + sin * y
        v = cos * y - sin * x
        r2 = ((u - u0[z]) / a[z]) ** 2 + ((v - v0[z]) / b[z]) ** 2
        yield z, (slice(y0, y1), slice(x0, x1)), r2, v

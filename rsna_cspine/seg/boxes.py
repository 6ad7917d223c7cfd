"""Where the cascade's grids lie in a study: boxes of a fixed size in millimetres, as voxel index ranges.

The coarse pass sees the whole scan at a coarse spacing, the fine pass ``grid × spacing`` mm around
the neck. Both are index boxes of the original volume (a box may reach beyond the scan; what lies
outside reads as air), so the centre-aligned resampling of :mod:`rsna_cspine.seg.preprocess` and its
inverse in :mod:`rsna_cspine.seg.masks` map grid voxels to original voxels exactly as for the
whole-volume grid: a box's side is a whole number of original voxels, so the fine grid's spacing is
the requested one to within one original voxel over the box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np



def nearest_indices(n_source: int, n_target: int) -> np.ndarray:
    """Source index sampled by each target index under centre-aligned nearest-neighbour resampling.

    Target voxel ``i`` covers ``[i, i+1) * n_source / n_target`` in source units; it takes the source
    voxel containing its centre. The same rule maps labels down to the grid and masks back up, so a
    mask predicted on the grid lands where its image came from.

    Args:
        n_source: length of the axis being sampled.
        n_target: length of the resampled axis.
    """
    idx = np.floor((np.arange(n_target) + 0.5) * (n_source / n_target)).astype(np.int64)
    return np.clip(idx, 0, n_source - 1)


@dataclass(frozen=True)
class VoxelBox:
    """Voxels ``[start, start + size)`` along each axis ``(z, y, x)`` of a volume; ``start`` may be negative.

    Attributes:
        start: first voxel index per axis.
        size: voxels per axis (≥ 1).
    """

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> VoxelBox:
        """The box of a whole volume."""
        return cls((0, 0, 0), tuple(int(n) for n in shape))  # type: ignore[arg-type]

    @classmethod
    def centred(cls, centre: Sequence[float], size: Sequence[int]) -> VoxelBox:
        """The box of ``size`` voxels whose middle is closest to ``centre`` (voxel coordinates).

        Args:
            centre: ``(z, y, x)`` in voxel index units (a voxel's centre is its index).
            size: voxels per axis.
        """
        size = tuple(max(1, int(s)) for s in size)
        start = tuple(int(np.floor(c - (s - 1) / 2 + 0.5)) for c, s in zip(centre, size))
        return cls(start, size)  # type: ignore[arg-type]

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(a + n for a, n in zip(self.start, self.size))  # type: ignore[return-value]

    def inside(self, shape: Sequence[int]) -> bool:
        """Whether the box lies entirely inside a volume of ``shape``."""
        return all(a >= 0 and b <= n for a, b, n in zip(self.start, self.stop, shape))

    def overlap(self, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """``(in the volume, in the box)`` slices of the part of the box inside a volume; None when none is.

        Args:
            shape: the volume's ``(z, y, x)``.
        """
        volume, box = [], []
        for a, b, n in zip(self.start, self.stop, shape):
            lo, hi = max(a, 0), min(b, int(n))
            if hi <= lo:
                return None
            volume.append(slice(lo, hi))
            box.append(slice(lo - a, hi - a))
        return tuple(volume), tuple(box)

    def to_list(self) -> list[list[int]]:
        """``[start, size]`` as plain lists (JSON, ``.npz``)."""
        return [list(self.start), list(self.size)]


def box_size(volume_spacing: Sequence[float], grid: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Original voxels per axis of a box of ``grid × spacing`` mm.

    Args:
        volume_spacing: the study's ``(dz, dy, dx)`` in mm.
        grid: grid voxels per axis.
        spacing: mm per grid voxel.
    """
    return tuple(max(1, int(round(g * s / v))) for g, s, v in zip(grid, spacing, volume_spacing))  # type: ignore[return-value]


#: Relative neck lengths outside this band are not taken for a patient's size (a localiser that merged
#: the skull base in, labels that ran into the chest): the box keeps its reference size there.
SIZE_BAND = (0.55, 1.6)


def size_scale(neck_mm: float, reference_mm: float) -> float:
    """How much larger (> 1) or smaller than the reference this patient's neck is: the fine box's factor.

    A neck ``neck_mm`` long is seen in a box ``neck_mm / reference_mm`` times the configured size, so
    every neck fills the grid alike and the fine network tells C5 from C6 by shape and order, not by
    millimetres from the skull base (a network trained on adult-sized necks shifted the levels of necks
    0.7 times as long by half a vertebra; benchmarks/results/evidence.md, "Stage 1: patient size").
    1.0 when ``reference_mm`` is 0 (off) or the ratio is outside :data:`SIZE_BAND`.

    Args:
        neck_mm: the neck's length (``seg.masks.neck_length_mm``).
        reference_mm: the same measure of a reference neck (``data.reference_neck_mm``).
    """
    if reference_mm <= 0 or neck_mm <= 0:
        return 1.0
    ratio = neck_mm / reference_mm
    return float(ratio) if SIZE_BAND[0] <= ratio <= SIZE_BAND[1] else 1.0


def coarse_shape(shape: Sequence[int], volume_spacing: Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid shape of a whole volume seen at ``spacing`` mm per voxel (at least one voxel per axis).

    Args:
        shape: the volume's ``(z, y, x)``.
        volume_spacing: its ``(dz, dy, dx)`` in mm.
        spacing: mm per coarse voxel.
    """
    return tuple(max(1, int(round(n * v / s))) for n, v, s in zip(shape, volume_spacing, spacing))  # type: ignore[return-value]


def read_box(array: np.ndarray, box: VoxelBox, fill: float, z: tuple[int, int] | None = None) -> np.ndarray:
    """The part of ``array`` under the box (a view when the box is inside it), ``fill`` outside it.

    Args:
        array: ``(z, y, x)`` volume (or memory map).
        box: the box, in the array's voxel indices.
        fill: value of voxels outside the array.
        z: only box slices ``[z0, z1)`` (box coordinates), for reading a few slices at a time.
    """
    z0, z1 = z if z is not None else (0, box.size[0])
    sub = VoxelBox((box.start[0] + z0, box.start[1], box.start[2]), (z1 - z0, box.size[1], box.size[2]))
    if sub.inside(array.shape):
        return np.asarray(array[tuple(slice(a, b) for a, b in zip(sub.start, sub.stop))])
    out = np.full(sub.size, fill, dtype=array.dtype)
    parts = sub.overlap(array.shape)
    if parts is not None:
        out[parts[1]] = array[parts[0]]
    return out


def sample_labels(labels: np.ndarray, box: VoxelBox, grid: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour label map of the box on ``grid`` (the rule of ``preprocess.resample_nearest``); 0 outside.

    Args:
        labels: ``(z, y, x)`` label map of the volume.
        box: the box, in its voxel indices.
        grid: target ``(D, H, W)``.
    """
    index, valid = [], []
    for a, n_box, g, n in zip(box.start, box.size, grid, labels.shape):
        idx = a + nearest_indices(n_box, int(g))
        valid.append((idx >= 0) & (idx < n))
        index.append(np.clip(idx, 0, n - 1))
    out = labels[np.ix_(*index)]
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return np.where(inside, out, 0).astype(labels.dtype, copy=False)


def grid_to_voxel(index: np.ndarray | float, n_grid: int, box_start: int, n_box: int) -> np.ndarray | float:
    """Original voxel coordinate of a grid position along one axis (centre-aligned, as ``nearest_indices``).

    Args:
        index: grid coordinate(s) (a voxel's centre is its index).
        n_grid: grid voxels along the axis.
        box_start: the box's first original voxel along the axis.
        n_box: the box's original voxels along the axis.
    """
    return box_start + (np.asarray(index, dtype=np.float64) + 0.5) * (n_box / n_grid) - 0.5


def label_centre(labels: np.ndarray, values: Sequence[int]) -> tuple[float, float, float] | None:
    """Middle of the bounding box of the voxels holding any of ``values``; None when there is none.

    Args:
        labels: ``(z, y, x)`` label map.
        values: label values that count (e.g. C1..C7).
    """
    hit = np.isin(labels, list(values))
    if not hit.any():
        return None
    centre = []
    for axis in range(3):
        present = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        centre.append((present[0] + present[-1]) / 2.0)
    return tuple(float(c) for c in centre)  # type: ignore[return-value]


@dataclass(frozen=True)
class CascadeGeometry:
    """The spacings and margins that shape the cascade's inputs (what a stage-1 cache file depends on).

    Attributes:
        spacing: mm per fine-grid voxel ``(z, y, x)``.
        margin_mm: extra mm on each side of the fine box stored for training (random localisation error).
        localiser_spacing: mm per coarse voxel.
        reference_neck_mm: neck length that the fine box's ``spacing`` is meant for; each study's box is
            scaled by :func:`size_scale` (0: every box the same size in mm).
    """

    spacing: tuple[float, float, float]
    margin_mm: tuple[float, float, float]
    localiser_spacing: tuple[float, float, float]
    reference_neck_mm: float = 0.0

    def margin_voxels(self) -> tuple[int, int, int]:
        """The margin in fine-grid voxels per side."""
        return tuple(int(round(m / s)) for m, s in zip(self.margin_mm, self.spacing))  # type: ignore[return-value]

    def settings(self) -> dict[str, list[float]]:
        """JSON-able form (part of the stage-1 cache fingerprint)."""
        out = {"spacing": [float(v) for v in self.spacing], "box_margin_mm": [float(v) for v in self.margin_mm],
               "localiser_spacing": [float(v) for v in self.localiser_spacing]}
        if self.reference_neck_mm > 0:  # absent when off, so caches written before it stay valid
            out["reference_neck_mm"] = [float(self.reference_neck_mm)]
        return out

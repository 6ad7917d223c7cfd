"""Bone density: a cortical shell over trabecular bone with a smooth texture, for every bone.

Vertebrae and the other bones (skull, mandible, hyoid, clavicles, ribs, scapulae, humeri) share this
model; only their cortical and trabecular HU and the cortical thickness differ (see ``tissues``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rsna_cspine.synth.geometry import Box, StudyGrid, tube_field
from rsna_cspine.synth.tissues import Painter, Tissue


def bone_density(grid: StudyGrid, box: Box, solid: np.ndarray, cancellous: float, cortical: float,
                 cortical_mm: float, seed: int) -> np.ndarray:
    """Cortical shell over trabecular bone with a smooth texture.

    Args:
        grid: study grid (for the voxel spacing).
        box: the block ``solid`` covers.
        solid: bool mask of the bone.
        cancellous: trabecular HU.
        cortical: cortical HU.
        cortical_mm: cortical thickness.
        seed: seed of the texture.

    Returns:
        float32 HU of the block (meaningful inside ``solid``).
    """
    rng = np.random.default_rng(seed)
    # Trabecular texture: smooth noise drawn at half resolution and repeated (8x cheaper than full).
    coarse = tuple((n + 1) // 2 for n in box.shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32),
                                      sigma=(max(0.3, 0.4 / grid.dz), 0.4 / grid.ps, 0.4 / grid.ps))
    texture = texture.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: box.shape[0], : box.shape[1], : box.shape[2]]
    texture /= max(float(texture.std()), 1e-6)
    hu = cancellous * (1.0 + 0.12 * texture)
    if solid.any():
        hu = np.where(cortical_shell(solid, grid, cortical_mm), cortical * (1.0 + 0.05 * texture), hu)
    return hu.astype(np.float32)


def cortical_shell(solid: np.ndarray, grid: StudyGrid, thickness_mm: float) -> np.ndarray:
    """Bone voxels within ``thickness_mm`` of the surface, and always the surface layer itself.

    Erosion by an anisotropic number of steps per axis (the voxels are not cubes) instead of a
    Euclidean distance transform: the same shell for these thin layers, about 8x faster.
    """
    eroded = ndimage.binary_erosion(solid, ndimage.generate_binary_structure(3, 1))
    steps_inplane = max(1, int(thickness_mm / grid.ps + 1e-6))
    steps_z = max(1, int(thickness_mm / grid.dz + 1e-6))
    if steps_inplane > 1:
        plane = np.zeros((3, 3, 3), dtype=bool)
        plane[1] = ndimage.generate_binary_structure(2, 1)
        eroded = ndimage.binary_erosion(eroded, plane, iterations=steps_inplane - 1)
    if steps_z > 1:
        axial = np.zeros((3, 3, 3), dtype=bool)
        axial[:, 1, 1] = True
        eroded = ndimage.binary_erosion(eroded, axial, iterations=steps_z - 1)
    return solid & ~eroded




def plain_bone(grid: StudyGrid, box: Box, mask: np.ndarray, density: tuple[float, float], seed: int,
               cortical_mm: float = 1.5) -> tuple[Box, np.ndarray, np.ndarray]:
    """``(box, mask, hu)`` of a bone that is not a vertebra: ``density`` = (trabecular, cortical) HU."""
    mask = np.broadcast_to(mask, box.shape).copy()
    return box, mask, bone_density(grid, box, mask, density[0], density[1], cortical_mm, seed)


def tube_bone(rho: np.ndarray, radius: float, density: tuple[float, float],
              cortical_mm: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Mask and HU of a long bone from its normalised tube distance ``rho`` (``geometry.tube_field``).

    The cortex is the outer ``cortical_mm`` of the tube (no erosion needed: ``rho`` is a distance).
    """
    mask = rho <= 1.0
    cortex = rho > 1.0 - cortical_mm / radius
    return mask, np.where(cortex, density[1], density[0]).astype(np.float32)


def paint_rod(painter: Painter, grid: StudyGrid, depth: np.ndarray, u: np.ndarray, v: np.ndarray, radius: float,
              density: tuple[float, float], cortical_mm: float, marrow: float = 0.0) -> None:
    """Paint a round bone along a centre line (``geometry.tube_field`` points), with fatty marrow inside
    ``marrow`` × radius when ``marrow`` > 0 (long bones)."""
    field_ = tube_field(grid, np.asarray(depth, dtype=float), np.asarray(u, dtype=float),
                        np.asarray(v, dtype=float), radius, radius)
    if field_ is None:
        return
    box, rho = field_
    mask, hu = tube_bone(rho, radius, density, cortical_mm)
    painter.fill(box.index, mask, Tissue.BONE, hu)
    if marrow > 0:
        painter.fill(box.index, rho <= marrow, Tissue.FAT)

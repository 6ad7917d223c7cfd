"""Image formation on top of the painted anatomy: metal streaks, partial volume, scanner noise.

Metal streaks follow the appearance described by Barrett JF, Keat N (*RadioGraphics* 2004;24:1679–1691):
dark and bright lines radiating from dense metal within its slices (beam hardening, photon
starvation), with a dark band along the line joining two metal objects. They are drawn, not simulated
from projections: a handful of thin spokes of random angle and sign per object, fading with distance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rsna_cspine.synth.geometry import StudyGrid


def metal_streaks(hu: np.ndarray, metal: np.ndarray, grid: StudyGrid, rng: np.random.Generator,
                  amplitude: tuple[float, float] = (300.0, 900.0)) -> int:
    """Add streaks in place to every slice of ``hu`` that holds metal.

    Args:
        hu: float32 ``(z, y, x)`` HU volume.
        metal: bool ``(z, y, x)`` metal voxels.
        grid: study grid (pixel spacing).
        rng: the study's artefact stream (a fixed number of draws per metal slice).
        amplitude: HU range of the strongest streaks next to the metal.

    Returns:
        Number of slices changed.
    """
    slices = np.nonzero(metal.any(axis=(1, 2)))[0]
    if not len(slices):
        return 0
    yy = (np.arange(grid.size, dtype=np.float32) * np.float32(grid.ps))[:, None]
    xx = (np.arange(grid.size, dtype=np.float32) * np.float32(grid.ps))[None, :]
    for z in slices:
        objects, n = ndimage.label(metal[z])
        centres = np.array(ndimage.center_of_mass(metal[z], objects, range(1, n + 1))) * grid.ps
        strength = rng.uniform(*amplitude)
        spokes = rng.uniform(0.0, np.pi, size=(n, 12))
        signs = rng.choice([-1.0, 1.0], size=(n, 12), p=[0.6, 0.4])
        width = np.deg2rad(rng.uniform(0.6, 1.5))
        streak = np.zeros((grid.size, grid.size), dtype=np.float32)
        for k, (cy, cx) in enumerate(centres):
            dy, dx = yy - np.float32(cy), xx - np.float32(cx)
            angle = np.arctan2(dy, dx) % np.pi  # a streak is a line through the object
            fade = np.float32(strength) / (1.0 + np.hypot(dy, dx) / np.float32(35.0))
            for phi, sign in zip(spokes[k], signs[k]):
                off = np.abs((angle - phi + np.pi / 2) % np.pi - np.pi / 2)
                streak += sign * fade * np.exp(-0.5 * (off / width) ** 2).astype(np.float32)
        for i in range(n):  # photon starvation between two metal objects: a dark band through both
            for j in range(i + 1, n):
                direction = centres[j] - centres[i]
                length = float(np.hypot(*direction))
                if length < 1e-3:
                    continue
                ny, nx = -direction[1] / length, direction[0] / length
                across = np.abs((yy - centres[i][0]) * ny + (xx - centres[i][1]) * nx)
                streak -= np.float32(0.6 * strength) * np.exp(-0.5 * (across / 2.0) ** 2).astype(np.float32)
        streak[metal[z]] = 0.0  # the metal itself stays saturated
        hu[z] += streak
    return len(slices)


def narrow_blur(volume: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Blur along one axis with the 3-tap kernel ``[w, 1 - 2w, w]`` of variance ``sigma²`` (edges repeat).

    For the sub-voxel sigmas of partial-volume smoothing this matches a Gaussian's variance with 3 taps;
    written with shifted slices because ``ndimage`` is several times slower along the slice axis.
    """
    w = np.float32(min(sigma**2 / 2.0, 1.0 / 3.0))
    moved = np.moveaxis(volume, axis, 0)
    out = moved * np.float32(1.0 - 2.0 * w)
    out[1:] += w * moved[:-1]
    out[:-1] += w * moved[1:]
    out[0] += w * moved[0]
    out[-1] += w * moved[-1]
    return np.moveaxis(out, 0, axis)

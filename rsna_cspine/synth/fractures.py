"""Fractures as local, visible defects in one vertebra's block.

A defect is a thin plane (optionally widening into a wedge) through the bone around a site on the
vertebra's surface ("break": the cortex is interrupted) or through the whole structure ("line"),
where HU drop by the configured contrast, floored at soft-tissue values. A fragment on one side of the
plane may be displaced by a few mm, and a vertebral body may lose height (compression, with a dense
impaction band under the collapsed endplate). Everything is drawn from the vertebra's own random
stream, so switching a fracture on or off changes nothing else in the study.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.geometry import StudyGrid
from rsna_cspine.synth.skeleton import FRACTURE_SITES, BoneBlock

#: HU change that counts a voxel as part of the visible defect.
DEFECT_THRESHOLD_HU = 50.0


@dataclass
class Defect:
    """One fracture plane; positions are mm in the block's ``(z, y, x)`` frame."""

    kind: str  # "break" or "line"
    part: str
    centre: np.ndarray
    normal: np.ndarray
    radius: float
    half_width: float
    wedge: float
    contrast: float
    floor: float
    shift_mm: np.ndarray | None = None


@dataclass
class FracturePlan:
    """All changes made to one fractured vertebra."""

    defects: list[Defect] = field(default_factory=list)
    compression: tuple[float, float] | None = None  # (height_loss, posterior_share)
    impaction_hu: float = 0.0

    @property
    def kinds(self) -> list[str]:
        """Short names of the changes, e.g. ``["break:body", "displaced", "compression"]``."""
        names = [f"{d.kind}:{d.part}" for d in self.defects]
        names += ["displaced" for d in self.defects if d.shift_mm is not None]
        if self.compression is not None:
            names.append("compression")
        return names


def plan_fracture(block: BoneBlock, grid: StudyGrid, cfg: SynthConfig,
                  rng: np.random.Generator) -> FracturePlan:
    """Draw the defects of one fractured vertebra, sited on its intact anatomy.

    Args:
        block: the intact vertebra.
        grid: study grid (voxel spacing).
        cfg: fracture knobs (size, contrast, height loss, shares of each kind).
        rng: this vertebra's fracture stream.

    Returns:
        The plan; apply it to a block built with ``plan.compression``.
    """
    spec = block.spec
    plan = FracturePlan()
    compress = rng.random() < cfg.compression_fraction
    loss, posterior_share = rng.uniform(*cfg.height_loss), rng.uniform(0.2, 1.0)
    impaction = rng.uniform(200.0, 400.0)
    if spec.has_body and compress and cfg.height_loss[1] > 0:
        plan.compression = (loss, posterior_share)
        plan.impaction_hu = impaction
    n_defects = 1 + int(rng.random() < cfg.second_defect_fraction)
    spacing = np.array(grid.spacing)
    surface = block.bone & ~ndimage.binary_erosion(block.bone)
    sites = FRACTURE_SITES[spec.kind]
    for _ in range(n_defects):
        present = [p for p in sites if p in block.parts and block.parts[p].any()]
        if not present:
            break
        weights = np.array([sites[p] for p in present])
        part = present[int(rng.choice(len(present), p=weights / weights.sum()))]
        candidates = np.argwhere(block.parts[part] & surface)
        if len(candidates) == 0:
            candidates = np.argwhere(block.parts[part])
        site = candidates[int(rng.integers(len(candidates)))] * spacing
        kind = "line" if rng.random() < cfg.line_fraction else "break"
        size = rng.uniform(*cfg.fracture_size_mm)
        normal = rng.normal(size=3)
        normal[0] *= rng.uniform(0.2, 1.0)  # mostly upright planes: seen as a line on many axial slices
        normal /= np.linalg.norm(normal) + 1e-12
        inward = rng.uniform(0.3, 0.7)
        half_width, wedge = rng.uniform(0.6, 1.2), rng.uniform(0.0, 1.5)
        contrast, floor = rng.uniform(*cfg.fracture_contrast_hu), rng.uniform(20.0, 70.0)
        displaced = rng.random() < cfg.displaced_fraction
        magnitude = rng.uniform(1.0, 3.0)
        tangent = rng.normal(size=3) * 0.3
        if kind == "line":
            centroid = np.argwhere(block.parts[part]).mean(axis=0) * spacing
            centre = site + (centroid - site) * inward
            radius = 0.8 * size
        else:
            centre = site.astype(float)
            radius = 0.5 * size
        shift = None
        if displaced:
            direction = normal + tangent - normal * float(tangent @ normal)
            shift = magnitude * direction / (np.linalg.norm(direction) + 1e-12)
        plan.defects.append(Defect(kind=kind, part=part, centre=centre, normal=normal, radius=radius,
                                   half_width=half_width, wedge=wedge, contrast=contrast, floor=floor,
                                   shift_mm=shift))
    return plan


def apply_fracture(block: BoneBlock, plan: FracturePlan, grid: StudyGrid) -> None:
    """Carve ``plan``'s defects into ``block`` (built with ``plan.compression``) in place."""
    if plan.compression is not None and "body" in block.parts:
        _impaction_band(block, grid, plan.impaction_hu)
    z, y, x = grid.physical(block.box)
    spacing = np.array(grid.spacing)
    for defect in plan.defects:
        dz, dy, dx = z - defect.centre[0], y - defect.centre[1], x - defect.centre[2]
        signed = defect.normal[0] * dz + defect.normal[1] * dy + defect.normal[2] * dx
        dist = np.sqrt(dz**2 + dy**2 + dx**2)
        # A plane thinner than the voxels would fall between voxel centres: keep it one voxel thick.
        min_half = 0.5 * float(np.abs(defect.normal) @ spacing)
        half = max(defect.half_width, min_half) * (1.0 + defect.wedge * dist / defect.radius)
        gap = block.bone & (dist <= defect.radius) & (np.abs(signed) <= half)
        if not gap.any() and block.bone.any():  # coarse grids: at least the nearest bone voxel
            nearest = np.unravel_index(np.argmin(np.where(block.bone, dist, np.inf)), block.bone.shape)
            gap[nearest] = True
        block.hu[gap] = np.maximum(block.hu[gap] - defect.contrast, defect.floor)
        if defect.shift_mm is not None:
            fragment = block.bone & (dist <= 1.25 * defect.radius) & (signed > half) & ~gap
            offset = np.rint(defect.shift_mm / spacing).astype(int)
            if not offset.any():
                axis = int(np.argmax(np.abs(defect.shift_mm) / spacing))
                offset[axis] = 1 if defect.shift_mm[axis] >= 0 else -1
            moved = _shifted(fragment, offset)
            moved_hu = _shifted(np.where(fragment, block.hu, 0.0), offset)
            block.bone &= ~fragment
            block.bone |= moved
            block.hu[moved] = moved_hu[moved]


def _impaction_band(block: BoneBlock, grid: StudyGrid, extra_hu: float) -> None:
    """Denser trabecular bone under a collapsed superior endplate."""
    body = block.parts["body"]
    layers = max(1, int(np.ceil(2.5 / grid.dz)))
    # Body voxels with no body `layers` slices above them: the top 2.5 mm of the collapsed body.
    band = body & ~_shifted(body, np.array([layers, 0, 0]))
    block.hu[band] = np.maximum(block.hu[band], block.spec.hu_cancellous + extra_hu)


def _shifted(array: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``array`` moved by an integer voxel offset, zero-filled (no wrap-around, unlike np.roll)."""
    out = np.zeros_like(array)
    src, dst = [], []
    for size, off in zip(array.shape, offset):
        off = int(off)
        if abs(off) >= size:
            return out
        src.append(slice(max(0, -off), size - max(0, off)))
        dst.append(slice(max(0, off), size - max(0, -off)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def fracture_mask(intact: BoneBlock, fractured: BoneBlock) -> np.ndarray:
    """Voxels of the block where the fracture visibly changed the vertebra (bool)."""
    changed = intact.bone != fractured.bone
    both = intact.bone & fractured.bone
    changed |= both & (np.abs(fractured.hu - intact.hu) > DEFECT_THRESHOLD_HU)
    return changed

"""The facial skeleton: orbits and globes, nasal cavity, sinuses, zygomas, maxilla, mandible and teeth.

Head-frame coordinates as in ``head`` (mm above the top of C1, normalised by the head scale). Placement
(Standring S, ed., *Gray's Anatomy*, 41st ed., 2016; Moore KL et al., *Clinically Oriented Anatomy*,
7th ed., 2014): the hard palate lies about level with C1 (its plane, Chamberlain's line to the
opisthion, passes just above the dens tip); the occlusal plane crosses about C2; the mandibular
angle overlies C2–C3 and the inferior border of the mandible C3–C4 in a neutral neck, so the mandible
sits anterior to C2–C3; the orbits lie ≈ 30–55 mm above C1 under the anterior cranial fossa, the
maxillary sinuses between the orbits and the upper teeth, the nasal cavity between them opening
backwards (choanae) into the nasopharynx. Teeth are denser than any bone; a share of studies carries
metal restorations (``SynthConfig.dental_metal_fraction``), which saturate and throw streaks
(``artefacts.metal_streaks``). HU per tissue: see ``tissues``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna_cspine.synth.bone import bone_density
from rsna_cspine.synth.geometry import segment_distance
from rsna_cspine.synth.head import HeadPlan, ellipsoid, head_block, smooth_field
from rsna_cspine.synth.skeleton import Skeleton
from rsna_cspine.synth.tissues import BONE_HU, Painter, Tissue

#: Mesiodistal crown widths (mm) from the central incisor back to the second molar (7 teeth a side).
TOOTH_WIDTHS = np.array([8.5, 6.5, 7.5, 7.0, 7.0, 10.0, 10.0])
#: Semi-axes of the lower dental arch's centre line (u, v); the upper arch is 3–4 % larger (overjet).
ARCH = (40.0, 54.0)


@dataclass
class DentalPlan:
    """Teeth of a study: ``missing`` and ``metal`` are ``(2, 14)`` bool (upper/lower arch × tooth)."""

    missing: np.ndarray
    metal: np.ndarray
    enamel: float
    dentin: float


def plan_teeth(rng: np.random.Generator, metal_fraction: float) -> DentalPlan:
    """Draw missing teeth and metal restorations (a fixed number of draws)."""
    loss_rate = rng.uniform(0.0, 0.2) if rng.random() >= 0.04 else 1.0  # a few studies are edentulous
    missing = rng.random((2, 14)) < loss_rate
    has_metal = rng.random() < metal_fraction
    n_metal = int(rng.integers(1, 6))
    order = rng.permutation(28)
    metal = np.zeros(28, dtype=bool)
    if has_metal:
        present = [k for k in order if not missing.flat[k]]
        metal[present[:n_metal]] = True
    return DentalPlan(missing=missing, metal=metal.reshape(2, 14),
                      enamel=float(rng.uniform(*BONE_HU["enamel"])), dentin=float(rng.uniform(*BONE_HU["dentin"])))


def paint_face(painter: Painter, skeleton: Skeleton, plan: HeadPlan, teeth: DentalPlan) -> None:
    """Orbits, sinuses, nasal cavity, zygomas, maxilla with the palate, mandible and teeth."""
    _paint_midface(painter, skeleton, plan)
    _paint_jaws(painter, skeleton, plan, teeth)


def _paint_midface(painter: Painter, skeleton: Skeleton, plan: HeadPlan) -> None:
    block = head_block(skeleton, plan, (-4.0, 60.0), (-66.0, 66.0), (-104.0, 0.0))
    if block is None:
        return
    box, u, v, z = block
    index = box.index
    au = np.abs(u)
    grid = skeleton.grid

    walls = ellipsoid(au, v, z, (27.0, -55.0, 17.0), (14.0, 21.0, 17.0)) <= 1.0  # maxillary sinuses
    walls |= ellipsoid(au, v, z, (32.0, -72.0, 40.0), (18.0, 23.0, 18.0)) <= 1.0  # bony orbits
    walls &= v > -92.0  # the orbits open anteriorly
    ethmoid = (au < 11.0) & (v > -92.0) & (v < -46.0) & (z > 26.0) & (z < 48.0)
    nose_half = 13.0 - 0.15 * np.maximum(z - 15.0, 0.0)
    nasal = (au < nose_half) & (v > -98.0) & (v < -28.0) & (z > -1.0) & (z < 30.0)
    zygoma = ellipsoid(au, v, z, (50.0, -64.0, 24.0), (7.0, 10.0, 11.0)) <= 1.0
    arch_dist, _ = segment_distance(au, v, np.array([[56.0, -58.0], [62.0, -12.0]]))
    zygoma |= (arch_dist <= 3.5) & (np.abs(z - 18.0) <= 3.5)
    bone = walls | ethmoid | zygoma | ((au < nose_half + 2.0) & (v > -98.0) & (v < -28.0) & (z > -3.0) & (z < 32.0))
    hu = bone_density(grid, box, bone, plan.density[0], plan.density[1], 1.2, plan.seed + 2)
    painter.fill(index, bone, Tissue.BONE, hu)

    painter.fill(index, ellipsoid(au, v, z, (27.0, -55.0, 17.0), (12.0, 19.0, 15.0)) <= 1.0, Tissue.AIR)
    painter.fill(index, (ellipsoid(au, v, z, (32.0, -72.0, 40.0), (16.0, 21.0, 16.0)) <= 1.0) & (v > -92.0),
                 Tissue.FAT)
    painter.fill(index, ellipsoid(au, v, z, (32.0, -86.0, 41.0), (12.0, 12.0, 12.0)) <= 1.0, Tissue.EYE)
    if ethmoid.any():
        cells = smooth_field(box.shape, plan.seed + 3, 1.5, grid.spacing) > -0.3
        painter.fill(index, ethmoid & cells, Tissue.AIR)
    painter.fill(index, nasal & (au > 1.0), Tissue.AIR)
    turbinates = ((((au - 10.0) / 3.5) ** 2 + ((z - 7.0) / 4.0) ** 2 <= 1.0) & (v > -85.0) & (v < -35.0)) | (
        (((au - 9.0) / 3.0) ** 2 + ((z - 18.0) / 3.5) ** 2 <= 1.0) & (v > -80.0) & (v < -45.0))
    painter.fill(index, turbinates & nasal, Tissue.MUSCLE)  # mucosa-covered turbinates


def _arch_radial(u: np.ndarray, v: np.ndarray, centre_v: float, grow: float) -> np.ndarray:
    """Signed distance (mm, approximately) of each voxel from the dental arch's centre line."""
    a, b = ARCH[0] * grow, ARCH[1] * grow
    rho = np.sqrt((u / a) ** 2 + ((v - centre_v) / b) ** 2)
    return (rho - 1.0) * np.float32(0.5 * (a + b))


def _tooth_index(u: np.ndarray, v: np.ndarray, centre_v: float, grow: float) -> tuple[np.ndarray, np.ndarray]:
    """``(tooth 0..13 within the arch, gap between two teeth)`` of each voxel (u < 0 side first)."""
    a, b = ARCH[0] * grow, ARCH[1] * grow
    phi = np.arctan2(np.abs(u) / a, -(v - centre_v) / b)
    edges = np.concatenate([[0.0], np.cumsum(TOOTH_WIDTHS)]) / TOOTH_WIDTHS.sum() * (np.pi / 2 + 0.08)
    tooth = np.clip(np.searchsorted(edges, phi) - 1, 0, len(TOOTH_WIDTHS) - 1)
    gap = np.minimum(phi - edges[tooth], edges[tooth + 1] - phi) < 0.012
    gap &= tooth > 0  # no gap between the central incisors' outer halves at the midline
    return (u >= 0) * len(TOOTH_WIDTHS) + tooth, gap


def _paint_jaws(painter: Painter, skeleton: Skeleton, plan: HeadPlan, teeth: DentalPlan) -> None:
    occ, vm = plan.occlusal, plan.mandible_v
    block = head_block(skeleton, plan, (plan.mandible_bottom - 1.0, 20.0), (-64.0, 64.0), (-96.0, vm + 34.0))
    if block is None:
        return
    box, u, v, z = block
    index = box.index
    au = np.abs(u)
    grid = skeleton.grid
    in_front = v < vm + 4.0

    lower_r = _arch_radial(u, v, vm, 1.0)
    upper_r = _arch_radial(u, v, vm, 1.035)
    mandible = in_front & (np.abs(lower_r) <= 5.5) & (z >= plan.mandible_bottom) & (z <= occ - 9.0)
    mandible |= in_front & (lower_r <= 0.0) & (lower_r >= -9.0) & (v < vm - 44.0) & (
        z >= plan.mandible_bottom) & (z <= occ - 12.0)  # the symphysis (chin) is thick
    splay = au - 0.15 * (v - vm)  # the rami diverge backwards
    ramus = (splay >= 37.0) & (splay <= 43.0) & (v >= vm - 2.0) & (v <= vm + 24.0) & (
        z >= plan.mandible_bottom + 6.0) & (z <= 10.0 + 0.3 * (v - vm))
    condyle = ellipsoid(au, v, z, (43.0, vm + 16.0, 13.0), (8.0, 5.0, 5.0)) <= 1.0
    maxilla = in_front & (np.abs(upper_r) <= 5.5) & (z >= occ + 9.0) & (z <= 2.0)
    palate = in_front & (upper_r <= 0.0) & (z >= -3.0) & (z <= 1.5)
    bone = mandible | ramus | condyle | maxilla | palate
    hu = bone_density(grid, box, bone, plan.density[0], plan.density[1], 2.5, plan.seed + 4)
    painter.fill(index, bone, Tissue.BONE, hu)

    # Teeth: crowns (enamel) at the occlusal plane, roots (dentin) in the alveolar bone.
    zs = np.nonzero(np.abs(z[:, 0, 0] - occ) <= 22.5)[0]
    if not len(zs):
        return
    rows = slice(int(zs[0]), int(zs[-1]) + 1)
    sub = (slice(index[0].start + rows.start, index[0].start + rows.stop), index[1], index[2])
    u, v, z = u[rows], v[rows], z[rows]
    in_front = in_front[rows]
    for arch, radial, grow in ((0, upper_r[rows], 1.035), (1, lower_r[rows], 1.0)):
        height = (z - occ) if arch == 0 else (occ - z)  # 0 at the biting surface, growing to the root apex
        band = in_front & (height >= 0.0) & (height <= 22.0) & (np.abs(radial) <= 4.0)
        if not band.any():
            continue
        ident, gap = _tooth_index(u, v, vm, grow)
        present = ~teeth.missing[arch][ident]
        crown = height <= 8.0
        root = (height > 8.0) & (np.abs(radial) <= 2.8 - 0.08 * (height - 8.0))
        solid = band & present & ~gap & (crown | root)
        values = np.where(crown, teeth.enamel, teeth.dentin).astype(np.float32)
        painter.fill(sub, solid, Tissue.TOOTH, values)
        painter.fill(sub, solid & crown & teeth.metal[arch][ident] & (height <= 6.0), Tissue.METAL)

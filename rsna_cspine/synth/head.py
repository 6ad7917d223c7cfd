"""The cranium: vault, skull base (occipital condyles, clivus, petrous ridges, mastoids), brain and CSF.

Shapes are written in a head frame normalised by the study's head scale: ``u`` (patient left) and
``v`` (posterior) in mm from the spinal centre line, ``z`` in mm above the top of C1. Adult figures
(Standring S, ed., *Gray's Anatomy*, 41st ed., 2016; Howells WW, *Cranial Variation in Man*, 1973):
cranial length ≈ 185 mm, breadth ≈ 145 mm, basion–bregma height ≈ 135 mm; vault 5–8 mm thick (two
cortical tables around diploë). The skull base steps up from back to front: the posterior fossa is a
bowl whose lowest point is the foramen magnum, just above the dens (basion–dens interval 4–6 mm,
under 12 mm: Harris JH et al., *AJR* 1994;162:881–886); the occipital condyles flank it and
articulate with C1's lateral masses; the clivus rises anteriorly from the basion to the dorsum
sellae; the petrous ridges run anteromedially from the mastoids and part the posterior from the
middle fossa (≈ 20 mm higher); the anterior fossa (orbital roofs) lies ≈ 50 mm above C1. The
mastoid processes reach down to C1's level, air cells within; the sphenoid sinus lies under the
sella. HU per tissue: see ``tissues``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rsna_cspine.synth.bone import bone_density
from rsna_cspine.synth.geometry import Box, segment_distance
from rsna_cspine.synth.skeleton import Skeleton
from rsna_cspine.synth.tissues import BONE_HU, Painter, Tissue

#: Foramen magnum centre v (mm, head frame): its anterior margin (basion) lies over the dens.
FORAMEN_V = 12.0
#: Petrous ridge, apex → lateral end, ``(u, v)`` in the head frame (u > 0 side).
PETROUS_RIDGE = np.array([[14.0, -14.0], [52.0, 14.0]])


@dataclass
class HeadPlan:
    """Study-level draws of the head (head-frame mm unless noted).

    Attributes:
        scale: head scale (mm per head-frame mm).
        a, b, c: outer semi-axes of the cranial vault (lateral, antero-posterior, vertical).
        vc, zc: v and z of the vault's centre.
        vault: vault thickness.
        density: (trabecular/diploë, cortical) HU of the skull and face bones.
        petrous: HU of the petrous bone.
        pneumatisation: share of the mastoid filled by air cells.
        occlusal: z of the occlusal plane (teeth meet), about C2's level.
        mandible_v: v of the centre of the mandibular arch.
        mandible_bottom: z of the inferior border of the mandible (between C3 and C4).
        seed: seed of the textures and cells.
    """

    scale: float
    a: float
    b: float
    c: float
    vc: float
    zc: float
    vault: float
    density: tuple[float, float]
    petrous: float
    pneumatisation: float
    occlusal: float
    mandible_v: float
    mandible_bottom: float
    seed: int


def plan_head(skeleton: Skeleton, rng: np.random.Generator) -> HeadPlan:
    """Draw the head of a study (a fixed number of draws)."""
    u = rng.uniform
    hs = skeleton.head_scale
    c2 = skeleton.by_name("C2")
    occlusal = skeleton.up(c2.top) / hs - u(0.0, 6.0)
    return HeadPlan(scale=hs, a=71.0 * u(0.93, 1.07), b=93.0 * u(0.95, 1.05), c=80.0, vc=-12.0, zc=62.0,
                    vault=u(5.0, 8.0), density=(u(350.0, 700.0), u(1200.0, 1800.0)),
                    petrous=u(*BONE_HU["petrous"]), pneumatisation=u(0.2, 0.9), occlusal=occlusal,
                    mandible_v=-u(22.0, 32.0), mandible_bottom=occlusal - u(32.0, 40.0),
                    seed=int(rng.integers(0, 2**62)))


def head_block(skeleton: Skeleton, plan: HeadPlan, z_range: tuple[float, float], u_range: tuple[float, float],
               v_range: tuple[float, float]) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray] | None:
    """Block of the grid holding a head-frame box, and ``(u, v, z)`` head-frame mm of its voxels."""
    hs = plan.scale
    grid = skeleton.grid
    box = grid.box(skeleton.skull_base - z_range[1] * hs, skeleton.skull_base - z_range[0] * hs,
                   (u_range[0] * hs, u_range[1] * hs), (v_range[0] * hs, v_range[1] * hs))
    if box is None:
        return None
    u, v = grid.local(box)
    z = (skeleton.up(grid.depth[box.z]) / hs).astype(np.float32)[:, None, None]
    inv = np.float32(1.0 / hs)
    return box, u * inv, v * inv, z


def ellipsoid(u: np.ndarray, v: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
              semi: tuple[float, float, float]) -> np.ndarray:
    """Normalised squared radius in an axis-aligned ellipsoid (≤ 1 inside)."""
    return ((u - centre[0]) / semi[0]) ** 2 + ((v - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2


def skull_floor(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(floor z, bone thickness)`` of the skull base under every ``(u, v)`` (head frame).

    Posterior fossa: a bowl rising from the foramen magnum, lifted in the midline by the clivus;
    anterior to the petrous ridges the middle fossa, rising medially into the sphenoid body and
    sella; in front of the sphenoid wings the anterior fossa over the orbits.
    """
    au = np.abs(u)
    d = np.maximum(np.hypot(u, 0.9 * (v - FORAMEN_V)) - 16.0, 0.0)
    posterior_floor = 5.0 + 0.12 * d + 0.005 * d * d
    basion = FORAMEN_V - 14.0
    clivus = 5.0 + 1.6 * (basion - v) - 0.06 * u * u
    posterior_floor = np.where(v < basion, np.maximum(posterior_floor, clivus), posterior_floor)
    (u0, v0), (u1, v1) = PETROUS_RIDGE
    ridge_v = v0 + np.maximum(au - u0, 0.0) * (v1 - v0) / (u1 - u0)
    posterior = v > ridge_v
    anterior = v < -42.0 - 0.15 * au
    # the middle fossa is a bowl (temporal lobes), deepest near its centre, rising into the sphenoid
    middle_floor = 17.0 + 0.015 * ((au - 42.0) ** 2 + 1.5 * (v + 22.0) ** 2) + 1.2 * np.maximum(18.0 - au, 0.0)
    # the orbital roofs bulge up into the anterior fossa; the cribriform plate between them is lower
    anterior_floor = 45.0 + 7.0 * np.exp(-(((au - 32.0) / 14.0) ** 2)) - 3.0 * (au < 6.0)
    floor = np.where(posterior, posterior_floor, np.where(anterior, anterior_floor, middle_floor))
    sphenoid = ~posterior & ~anterior & (au < 20.0)
    thickness = np.where(sphenoid, 26.0, np.where(posterior & (v < basion) & (au < 14.0), 12.0,
                                                   np.where(anterior, 4.0, 6.0)))
    return floor.astype(np.float32), thickness.astype(np.float32)


def smooth_field(shape: tuple[int, ...], seed: int, sigma_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Unit-variance smooth noise with a correlation length of ``sigma_mm`` (air cells, honeycombs),
    drawn at half resolution and repeated."""
    rng = np.random.default_rng(seed)
    coarse = tuple((n + 1) // 2 for n in shape)
    sigma = tuple(max(0.3, sigma_mm / (2.0 * d)) for d in spacing)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma)
    field = field.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: shape[0], : shape[1], : shape[2]]
    return field / max(float(field.std()), 1e-6)


def paint_cranium(painter: Painter, skeleton: Skeleton, plan: HeadPlan) -> None:
    """Brain, CSF and skull (vault, base, condyles, mastoids, petrous bones) with their air spaces."""
    grid = skeleton.grid
    block = head_block(skeleton, plan, (-16.0, plan.zc + plan.c + 1.0), (-plan.a - 2.0, plan.a + 2.0),
                       (plan.vc - plan.b - 2.0, plan.vc + plan.b + 2.0))
    if block is None:
        return
    box, u, v, z = block
    index = box.index
    au = np.abs(u)
    centre = (0.0, plan.vc, plan.zc)
    t = plan.vault
    outer = ellipsoid(u, v, z, centre, (plan.a, plan.b, plan.c))
    inner = ellipsoid(u, v, z, centre, (plan.a - t, plan.b - t, plan.c - t))
    floor, thickness = skull_floor(u, v)
    cavity = (inner <= 1.0) & (z > floor)
    bone = (outer <= 1.0) & (z > floor - thickness) & ~cavity

    # Brain: grey matter with a white-matter core, CSF over the convexity, ventricles and cisterns.
    painter.fill(index, cavity, Tissue.GREY_MATTER)
    core = (ellipsoid(u, v, z, centre, (plan.a - t - 14.0, plan.b - t - 16.0, plan.c - t - 14.0)) <= 1.0) & (
        z > floor + 12.0)
    core |= ellipsoid(au, v, z, (22.0, FORAMEN_V + 24.0, 20.0), (11.0, 11.0, 7.0)) <= 1.0  # cerebellum
    painter.fill(index, cavity & core, Tissue.WHITE_MATTER)
    rim = ellipsoid(u, v, z, centre, (plan.a - t - 2.5, plan.b - t - 2.5, plan.c - t - 2.5)) > 1.0
    csf = rim | (ellipsoid(au, v, z, (8.0, plan.vc + 2.0, plan.zc + 20.0), (5.0, 24.0, 9.0)) <= 1.0)
    csf |= ellipsoid(u, v, z, (0.0, plan.vc + 4.0, plan.zc + 6.0), (1.8, 11.0, 7.0)) <= 1.0  # third ventricle
    csf |= ellipsoid(u, v, z, (0.0, FORAMEN_V + 12.0, 24.0), (5.0, 4.0, 6.0)) <= 1.0  # fourth ventricle
    csf |= ellipsoid(u, v, z, (0.0, FORAMEN_V + 26.0, 12.0), (14.0, 9.0, 7.0)) <= 1.0  # cisterna magna
    painter.fill(index, cavity & csf, Tissue.CSF)

    # Skull base details: foramen magnum, condyles, mastoids, petrous ridges.
    foramen = (((u / 14.0) ** 2 + ((v - FORAMEN_V) / 15.0) ** 2) <= 1.0) & (z < 20.0)
    condyles = (((au - 12.5) / 6.0) ** 2 + ((v - 2.5) / 8.0) ** 2 <= 1.0) & (z >= 1.5) & (z <= 10.0)
    mastoid = (ellipsoid(au, v, z, (50.0, 14.0, 6.0), (9.0, 13.0, 16.0)) <= 1.0) & ~cavity
    ridge_dist, ridge_arc = segment_distance(au, v, PETROUS_RIDGE)
    along = ridge_arc / float(np.hypot(*(PETROUS_RIDGE[1] - PETROUS_RIDGE[0])))  # 0 at the apex, 1 laterally
    petrous = (ridge_dist <= 4.5 + 5.0 * along) & (z >= 14.0 - 10.0 * along) & (z <= 33.0 - 6.0 * along)
    bone = (bone & ~foramen) | condyles | mastoid | petrous
    hu = bone_density(grid, box, bone, plan.density[0], plan.density[1], 1.8, plan.seed)
    hu[petrous] = plan.petrous
    painter.fill(index, bone, Tissue.BONE, hu)

    # Air: mastoid cells (pneumatisation varies a lot between people), sphenoid sinus, ear canals.
    cells_zone = (mastoid | (petrous & (au > 34.0))) & (z > -4.0)
    if cells_zone.any():
        field = smooth_field(box.shape, plan.seed + 1, 1.2, grid.spacing)
        threshold = np.quantile(field[cells_zone], 1.0 - 0.6 * plan.pneumatisation)
        painter.fill(index, cells_zone & (field > threshold), Tissue.AIR)
    sphenoid = ellipsoid(u, v, z, (0.0, -34.0, 30.0), (15.0, 11.0, 10.0)) <= 1.0
    ear_canal = (au >= 40.0) & (((v + 1.0) / 3.5) ** 2 + ((z - 16.0) / 3.5) ** 2 <= 1.0)
    painter.fill(index, sphenoid | ear_canal, Tissue.AIR)

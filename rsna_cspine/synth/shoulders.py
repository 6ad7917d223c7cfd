"""The thoracic inlet and shoulder girdle: ribs, lung apices, manubrium, clavicles, scapulae, humeri, arms.

Placement follows the adult anatomy of the cervicothoracic junction (Standring S, ed., *Gray's Anatomy*,
41st ed., Elsevier 2016; Moore KL, Dalley AF, Agur AMR, *Clinically Oriented Anatomy*, 7th ed., 2014):
the first rib articulates with T1 and curves around the lung apex to the manubrium; the apex of each
lung rises to the level of the T1 body (2–3 cm above the medial third of the clavicle); the
jugular notch of the manubrium lies at the T2–T3 disc, with the sternoclavicular joints just above
it; the clavicle runs laterally and slightly upwards to the acromion, level with C7–T1; the
scapula lies on the posterior chest wall from its superior angle (T2) downwards, its spine rising
laterally to the acromion; the humeral head sits against the glenoid below the acromion. All of
this is bone with label 0 (not a vertebra); sizes are adult averages in mm times the study's anatomy
scale, in the spine-following frame of ``geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna_cspine.synth.bone import bone_density, paint_rod, tube_bone
from rsna_cspine.synth.geometry import StudyGrid, resample_path, tube_field
from rsna_cspine.synth.skeleton import Skeleton, VertebraSpec
from rsna_cspine.synth.tissues import Painter, Tissue

#: Per thoracic level T1..T4: lateral reach of the rib ring, its anterior and posterior v (mm at scale 1),
#: and the half-width of the mediastinum between the lungs.
RING_WIDTH = (52.0, 72.0, 86.0, 94.0)
RING_FRONT = (-50.0, -60.0, -68.0, -74.0)
RING_BACK = (24.0, 30.0, 36.0, 40.0)
MEDIASTINUM = (14.0, 18.0, 22.0, 26.0)
#: Humerus centre line ``(u, v, depth below the head centre)`` at scale 1, arm hanging beside the chest.
HUMERUS = np.array([[138.0, 2.0, 0.0], [150.0, 4.0, 60.0], [160.0, 6.0, 160.0]])


@dataclass
class ShoulderPlan:
    """Study-level draws of the shoulder girdle (mm at the study's scale, depths in the grid frame)."""

    clavicle_depth: float  # depth of the sternoclavicular joints
    scapula_depth: float  # depth of the superior angle
    arms: bool
    lung_apex: float  # depth of the lung apices
    density: tuple[float, float]  # (trabecular, cortical) HU
    cortical_mm: float
    seed: int  # bone texture


def plan_shoulders(skeleton: Skeleton, arms_fraction: float, rng: np.random.Generator) -> ShoulderPlan:
    """Draw the shoulder girdle of a study (a fixed number of draws)."""
    s = skeleton.params["scale"]
    t1 = skeleton.by_name("T1")
    u = rng.uniform
    return ShoulderPlan(clavicle_depth=t1.bottom + u(-2.0, 10.0) * s, scapula_depth=t1.bottom + u(0.0, 12.0) * s,
                        arms=bool(rng.random() < arms_fraction), lung_apex=t1.top - u(0.0, 8.0),
                        density=(u(250.0, 450.0), u(1000.0, 1600.0)), cortical_mm=u(1.5, 2.5),
                        seed=int(rng.integers(0, 2**62)))


def rib_path(spec: VertebraSpec) -> tuple[np.ndarray, int]:
    """``(points (n, 2), n_bone)``: local ``(u, v)`` of one rib (u > 0 side); the first ``n_bone``
    points are bone, the rest costal cartilage reaching towards the sternum."""
    s = spec.scale
    j = spec.label - 8
    width, front, back = RING_WIDTH[j] * s, RING_FRONT[j] * s, RING_BACK[j] * s
    start_u, start_v = spec.cax + 2.0 * s, spec.canal_v - 1.0 * s
    tubercle = (spec.tp_len - 2.0 * s, start_v + 0.45 * (spec.tp_len - start_u) - 6.0 * s)
    bone_end = (24.0 * s if j == 0 else 38.0 * s, front + 2.0 * s)
    points = [(spec.ax + 1.0 * s, 0.35 * spec.ay), tubercle, (max(0.62 * width, tubercle[0] + 4 * s), back),
              (width, 0.5 * (back + front) + 8.0 * s), (0.75 * width, front + 0.2 * (back - front)), bone_end]
    smooth = _chaikin(np.array(points), 2)
    cartilage = [] if j == 0 else [(16.0 * s, front - 1.0 * s)]
    return np.vstack([smooth, np.array(cartilage).reshape(-1, 2)]), len(smooth)


def _chaikin(points: np.ndarray, rounds: int) -> np.ndarray:
    """Corner cutting (Chaikin) keeping both end points: a smooth curve through a rough polyline."""
    for _ in range(rounds):
        a, b = points[:-1], points[1:]
        cut = np.empty((2 * len(a), points.shape[1]))
        cut[0::2] = 0.75 * a + 0.25 * b
        cut[1::2] = 0.25 * a + 0.75 * b
        points = np.vstack([points[:1], cut[1:-1], points[-1:]])
    return points


def paint_ribs(painter: Painter, grid: StudyGrid, spec: VertebraSpec) -> None:
    """Both ribs of a thoracic vertebra (bone, then costal cartilage), descending anteriorly."""
    s = spec.scale
    path, n_bone = rib_path(spec)
    r_inplane, r_z = 3.6 * s, 5.0 * s
    drop = 0.13 if spec.label == 8 else 0.16  # anterior ends lie one to two levels lower
    for part, points in (("bone", path[:n_bone]), ("cartilage", path[n_bone - 1:])):
        if len(points) < 2:
            continue
        samples, arc = resample_path(points, 0.5 * r_inplane)
        offset = 0.0 if part == "bone" else float(resample_path(path[:n_bone], 1.0)[1][-1])
        depth = spec.centre + 0.05 * spec.height + drop * (arc + offset)
        for side in (1.0, -1.0):
            field_ = tube_field(grid, depth, side * samples[:, 0], samples[:, 1], r_inplane, r_z, spec.theta)
            if field_ is None:
                continue
            box, rho = field_
            if part == "bone":
                mask, hu = tube_bone(rho, r_inplane, (spec.hu_cancellous, spec.hu_cortex), spec.cortical_mm)
                painter.fill(box.index, mask, Tissue.BONE, hu)
            else:
                painter.fill(box.index, rho <= 0.9, Tissue.CARTILAGE)


def paint_lungs(painter: Painter, skeleton: Skeleton, plan: ShoulderPlan, habitus: float) -> None:
    """Lung apices from ``plan.lung_apex`` down, inside each level's rib ring, beside the mediastinum."""
    grid = skeleton.grid
    s = skeleton.params["scale"]
    thoracic = [v for v in skeleton.vertebrae if v.kind == "T"]
    centres = [v.centre for v in thoracic]
    rings = np.array([[(MEDIASTINUM[j] + RING_WIDTH[j]) / 2, (RING_BACK[j] + RING_FRONT[j]) / 2 + 2.0,
                       (RING_WIDTH[j] - MEDIASTINUM[j]) / 2 - 3.0, (RING_BACK[j] - RING_FRONT[j]) / 2 - 4.0]
                      for j in range(len(thoracic))]) * s
    box = grid.box(plan.lung_apex, grid.nz * grid.dz, (-float(rings[:, 0].max() + rings[:, 2].max()),
                                                       float(rings[:, 0].max() + rings[:, 2].max())),
                   (float((rings[:, 1] - rings[:, 3]).min()), float((rings[:, 1] + rings[:, 3]).max())))
    if box is None:
        return
    depth = grid.depth[box.z]
    cu, cv, a, b = (np.interp(depth, centres, rings[:, k]).astype(np.float32)[:, None, None] for k in range(4))
    grow = np.sqrt(np.clip((depth - plan.lung_apex) / 40.0, 0.0, 1.0)).astype(np.float32)[:, None, None]
    fill = np.float32(min(1.0, 0.85 * habitus) ** 0.5) * grow + np.float32(1e-3)
    u, v = grid.local(box)
    inside = ((np.abs(u) - cu) / (a * fill)) ** 2 + ((v - cv) / (b * fill)) ** 2 <= 1.0
    painter.fill(box.index, inside, Tissue.LUNG, where=~painter.is_(box.index, Tissue.AIR))


def paint_shoulder_bones(painter: Painter, skeleton: Skeleton, plan: ShoulderPlan) -> None:
    """Manubrium, clavicles, scapulae (body, spine, glenoid), humeral heads and, with arms, shafts."""
    grid = skeleton.grid
    s = skeleton.params["scale"]
    spec = skeleton.by_name("T2")
    front = RING_FRONT[1] * s
    density, cortical = plan.density, plan.cortical_mm
    top = plan.clavicle_depth + 4.0 * s  # jugular notch, between the clavicular heads

    # Manubrium: a plate in front of the upper mediastinum, wide at the clavicular notches.
    box = grid.box(top, grid.nz * grid.dz, (-26.0 * s, 26.0 * s), (front - 13.0 * s, front + 1.0 * s))
    if box is not None:
        u, v = grid.local(box)
        below = grid.depth_from(box, top)
        half = np.interp(below, [0.0, 40.0 * s], [24.0 * s, 16.0 * s]).astype(np.float32)
        notch = (below < 6.0 * s) & (np.abs(u) < 8.0 * s)  # the jugular notch
        mask = (np.abs(u) <= half) & (np.abs(v - (front - 6.0 * s)) <= 5.5 * s) & (below >= 0) & ~notch
        painter.fill(box.index, mask, Tissue.BONE, bone_density(grid, box, mask, *density, cortical, plan.seed))

    clavicle = np.array([(18.0, front / s - 8.0), (50.0, front / s - 10.0), (88.0, front / s + 6.0),
                         (118.0, -8.0), (132.0, 8.0)]) * s
    scapula_spine = np.array([(60.0, RING_BACK[1] + 24.0), (100.0, 32.0), (126.0, 22.0)]) * s
    for side in (1.0, -1.0):
        samples, arc = resample_path(_chaikin(clavicle, 2), 3.0 * s)
        paint_rod(painter, grid, plan.clavicle_depth - 0.12 * arc, side * samples[:, 0], samples[:, 1], 6.0 * s,
             density, cortical)
        _scapula_body(painter, grid, skeleton, plan, side)
        spine_depth = np.array([skeleton.by_name("T3").centre, spec.top, skeleton.by_name("T1").top - 2.0 * s])
        points, arc = resample_path(np.column_stack([scapula_spine, spine_depth]), 2.5 * s)
        paint_rod(painter, grid, points[:, 2], side * points[:, 0], points[:, 1], 4.5 * s, density, cortical)
        head_depth = humeral_head_depth(skeleton)
        paint_rod(painter, grid, np.array([head_depth, head_depth + 0.1]), np.full(2, side * HUMERUS[0][0] * s),
             np.full(2, HUMERUS[0][1] * s), 22.0 * s, density, 2.0)
        if plan.arms:  # humeral shaft down the arm, with fatty marrow
            shaft = HUMERUS * np.array([s, s, s]) + np.array([0.0, 0.0, head_depth])
            points, _ = resample_path(shaft, 4.0 * s)
            paint_rod(painter, grid, points[:, 2], side * points[:, 0], points[:, 1], 11.0 * s, density, 3.5,
                 marrow=0.45)


def _scapula_body(painter: Painter, grid: StudyGrid, skeleton: Skeleton, plan: ShoulderPlan, side: float) -> None:
    """The scapular blade on the posterior chest wall, thin medially, with a thick lateral border."""
    s = skeleton.params["scale"]
    medial = np.array([56.0, RING_BACK[1] + 16.0]) * s
    lateral = np.array([112.0, 6.0]) * s
    glenoid_depth = skeleton.by_name("T2").top
    box = grid.box(min(plan.scapula_depth, glenoid_depth - 16.0 * s), grid.nz * grid.dz,
                   tuple(sorted((side * 50.0 * s, side * 122.0 * s))), (-8.0 * s, float(medial[1] + 8.0 * s)))
    if box is None:
        return
    u, v = grid.local(box)
    au = side * u
    direction = (lateral - medial) / np.linalg.norm(lateral - medial)
    t = (au - medial[0]) * direction[0] + (v - medial[1]) * direction[1]
    across = np.abs((au - medial[0]) * direction[1] - (v - medial[1]) * direction[0])
    length = float(np.linalg.norm(lateral - medial))
    half = 1.6 * s + 2.4 * s * np.clip((t / length - 0.8) / 0.2, 0.0, 1.0)  # thick lateral border
    depth = grid.depth_from(box, plan.scapula_depth)
    reach = np.clip(depth / (25.0 * s), 0.0, 1.0)  # the superior angle is a point; the blade widens below
    blade = (depth >= 0) & (t >= length * (1.0 - reach) * 0.5) & (t <= length) & (across <= half)
    glenoid = ((au - 114.0 * s) / (6.0 * s)) ** 2 + ((v - 4.0 * s) / (10.0 * s)) ** 2 <= 1.0
    glenoid &= np.abs(grid.depth_from(box, glenoid_depth)) <= 16.0 * s
    mask = blade | glenoid
    cortex = (across > half - plan.cortical_mm) | glenoid
    hu = np.where(cortex, plan.density[1], plan.density[0]).astype(np.float32)
    painter.fill(box.index, mask, Tissue.BONE, hu)


def arm_ellipses(skeleton: Skeleton, plan: ShoulderPlan, habitus: float) -> list[tuple[np.ndarray, ...]]:
    """Outline ellipses ``(u0, v0, a, b)`` per slice of the arms beside the chest (empty without arms)."""
    if not plan.arms:
        return []
    grid = skeleton.grid
    s = skeleton.params["scale"]
    start = skeleton.by_name("T2").centre
    depth = grid.depth
    present = np.clip((depth - start) / (12.0 * s), 0.0, 1.0)  # the arm separates from the shoulder
    a = (40.0 * s * habitus) * present + 1e-3
    b = (46.0 * s * habitus) * present + 1e-3
    along = HUMERUS[:, 2] * s + humeral_head_depth(skeleton)
    u0 = np.interp(depth, along, HUMERUS[:, 0] * s)
    v0 = np.interp(depth, along, HUMERUS[:, 1] * s)
    return [(side * u0, v0, a, b) for side in (1.0, -1.0)]


def humeral_head_depth(skeleton: Skeleton) -> float:
    """Depth of the centre of the humeral heads: just below the acromion, level with the top of T2."""
    return skeleton.by_name("T2").top - 2.0 * skeleton.params["scale"]

"""The spine: where each vertebra sits, its parts, and its Hounsfield units; the scan's grid on it.

The patient is laid out from the vertex of the skull (``HEAD_HEIGHT_MM`` above C1) down to T4, then
seen through the study's scan window (``fov``), whose first slice is depth 0 of the grid. Dimensions
are adult averages in mm (multiplied by the study's anatomy scale): cervical bodies grow from C3 to
C7, C1 is a ring with lateral masses and no body, C2 carries the dens into C1's ring, the thoracic
vertebrae are larger (their ribs: ``shoulders``). Each vertebra is built in its own sub-block of the
volume from simple implicit shapes (ellipses, slabs, tubes) in the spine-following frame of
``geometry``; the cortical shell is every bone voxel within the cortical thickness of the surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rsna_cspine.synth.bone import bone_density
from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.fov import ScanWindow, draw_fov_kind, plan_window
from rsna_cspine.synth.geometry import Box, StudyGrid, ellipse, segment_distance

#: Thoracic vertebrae always modelled (a scan covers up to ``SynthConfig.thoracic_vertebrae`` of them).
MODELLED_THORACIC = 4
#: Vertex of the skin to the top of C1 at head scale 1: basion–bregma height ≈ 130–140 mm in adults
#: (Howells WW, *Cranial Variation in Man*, Peabody Museum Papers 67, 1973), the basion ≈ 5 mm above
#: the dens tip (Harris JH et al., *AJR* 1994;162:881–886), plus the scalp.
HEAD_HEIGHT_MM = 147.0

#: Components a fracture can be placed on, per vertebra kind, with their probabilities.
FRACTURE_SITES: dict[str, dict[str, float]] = {
    "C1": {"anterior_arch": 0.35, "posterior_arch": 0.35, "lateral_mass": 0.3},
    "C2": {"dens": 0.35, "body": 0.3, "posterior": 0.25, "processes": 0.1},
    "C": {"body": 0.55, "posterior": 0.35, "processes": 0.1},
    "T": {"body": 0.55, "posterior": 0.35, "processes": 0.1},
}


@dataclass
class VertebraSpec:
    """Size, position and density of one vertebra (mm, HU); see module docstring for the frame."""

    label: int
    name: str
    kind: str  # "C1", "C2", "C" (C3–C7) or "T"
    centre: float  # depth of the body centre (C1: of the lateral masses)
    top: float  # depth of the body's superior endplate (C1: top of the ring)
    bottom: float  # depth of the inferior endplate
    disc_above: float
    disc_below: float
    scale: float
    ax: float  # body semi-axis along u (lateral)
    ay: float  # body semi-axis along v (antero-posterior)
    cax: float  # spinal canal semi-axes
    cay: float
    ring: float  # pedicle/lamina thickness
    spinous_len: float
    spinous_half_w: float
    spinous_half_h: float
    spinous_slope: float
    tp_len: float  # lateral reach of the transverse processes
    foramen_r: float  # foramen transversarium radius (0: none)
    theta: float  # own axial twist (rad)
    hu_cancellous: float
    hu_cortex: float
    cortical_mm: float
    texture_seed: int
    benign_seed: int
    benign_rate: float
    dens_height: float = 0.0

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def canal_v(self) -> float:
        """v of the spinal canal centre."""
        if self.kind == "C1":
            return 14.0 * self.scale  # behind the dens
        return self.ay + self.cay + 0.6 * self.scale

    @property
    def has_body(self) -> bool:
        return self.kind != "C1"

    def local_extent(self) -> tuple[float, float, float, float, float]:
        """``(top, bottom, u_max, v_min, v_max)`` depth/mm bounds of everything this vertebra builds."""
        s = self.scale
        if self.kind == "C1":
            return (self.top - 2 * s, self.bottom + 2 * s, 40 * s, -17 * s, 34 * s)
        v_max = self.canal_v + self.cay + self.ring + self.spinous_len + 5 * s
        drop = self.spinous_slope * (self.cay + self.ring + self.spinous_len) + self.spinous_half_h
        top = self.top - max(self.dens_height, 0.5 * self.disc_above + 3 * s) - 3 * s
        bottom = max(self.bottom + 0.5 * self.disc_below + 2 * s, self.centre + drop + 2 * s)
        u_max = max(self.tp_len, self.cax + self.ring) + 4 * s
        v_min = -(self.ay + 6 * s)
        return (top, bottom, u_max, v_min, v_max)


@dataclass
class Skeleton:
    """Layout of one study: the vertebrae, the grid, the scan window and study-level parameters.

    Depths are mm below the top of the scan (the grid's frame); ``head_height`` converts: the
    patient's vertex lies at depth ``skull_base - head_height``.
    """

    vertebrae: list[VertebraSpec]
    grid: StudyGrid
    total_depth: float
    skull_base: float  # depth of C1's top (the occipital condyles sit just above)
    window: ScanWindow
    head_scale: float
    params: dict[str, float] = field(default_factory=dict)

    def by_name(self, name: str) -> VertebraSpec:
        return next(v for v in self.vertebrae if v.name == name)

    @property
    def head_height(self) -> float:
        """Vertex of the skin to the top of C1 (mm)."""
        return HEAD_HEIGHT_MM * self.head_scale

    def up(self, depth: np.ndarray | float) -> np.ndarray | float:
        """Height (mm) above the top of C1 of a depth (positive = superior, towards the vertex)."""
        return self.skull_base - depth


@dataclass
class BoneBlock:
    """One vertebra built in its sub-block: masks and HU before noise (HU valid where ``bone``)."""

    spec: VertebraSpec
    box: Box
    bone: np.ndarray  # bool, voxels of the vertebra (label = spec.label)
    hu: np.ndarray  # float32
    parts: dict[str, np.ndarray]  # component name → bool mask (fracture sites)


def plan_skeleton(cfg: SynthConfig, rng: np.random.Generator, fov_rng: np.random.Generator,
                  fov_kind: str | None = None) -> Skeleton:
    """Draw the patient's skeleton from the vertex to T4, then the scan window on it and its grid.

    Args:
        cfg: generator settings.
        rng: the study's anatomy stream.
        fov_rng: the study's field-of-view stream (window, slice spacing, pixel size).
        fov_kind: force a window kind (``fov.FOV_KINDS``); None draws it with the configured shares.

    Returns:
        The layout with its sampling grid.
    """
    u = rng.uniform
    scale = u(*cfg.anatomy_scale)
    head_scale = scale * u(0.94, 1.06)
    n_thoracic = int(rng.integers(cfg.thoracic_vertebrae[0], cfg.thoracic_vertebrae[1] + 1))
    benign_rate = u(*cfg.benign_rate)
    cancellous = u(200.0, 400.0)  # bone density of this patient (osteopenic … dense)
    cortex = u(700.0, 1500.0)
    cortical_mm = u(1.0, 2.0)
    margin_bottom = u(-6.0, 12.0)

    names = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"] + [f"T{i + 1}" for i in range(MODELLED_THORACIC)]
    specs: list[VertebraSpec] = []
    depth = HEAD_HEIGHT_MM * head_scale  # patient depth below the vertex of C1's top
    for label, name in enumerate(names, start=1):
        s = scale * u(0.97, 1.03)
        kind = name if name in ("C1", "C2") else name[0]
        disc_above = 0.0 if label <= 2 else u(3.5, 6.0) * s if kind == "C" else u(4.5, 7.0) * s
        if rng.random() < benign_rate * 0.5:
            disc_above *= 0.6  # degenerative disc narrowing
        seeds = rng.integers(0, 2**62, size=2)
        common = dict(label=label, name=name, kind=kind, scale=s, theta=float(rng.normal(0.0, 0.025)),
                      hu_cancellous=cancellous * u(0.9, 1.1), hu_cortex=cortex * u(0.92, 1.08),
                      cortical_mm=cortical_mm, texture_seed=int(seeds[0]), benign_seed=int(seeds[1]),
                      benign_rate=benign_rate, disc_below=0.0)
        if kind == "C1":
            height = 11.0 * s
            spec = VertebraSpec(centre=depth + height / 2, top=depth, bottom=depth + height,
                                disc_above=0.0, ax=0.0, ay=0.0, cax=12.0 * s, cay=10.0 * s, ring=5.0 * s,
                                spinous_len=0.0, spinous_half_w=0.0, spinous_half_h=0.0, spinous_slope=0.0,
                                tp_len=37.0 * s, foramen_r=2.6 * s, **common)
            # C2's superior facets sit 1.5 mm below C1's lateral masses and rise 2.5 mm above its body.
            depth += height + 4.0 * s
        elif kind == "C2":
            height = 17.5 * s
            spec = VertebraSpec(centre=depth + height / 2, top=depth, bottom=depth + height,
                                disc_above=0.0, ax=8.4 * s, ay=8.0 * s, cax=12.0 * s, cay=8.0 * s,
                                ring=4.2 * s, spinous_len=14.0 * s, spinous_half_w=4.0 * s,
                                spinous_half_h=5.5 * s, spinous_slope=0.3, tp_len=8.4 * s + 9.0 * s,
                                foramen_r=2.5 * s, dens_height=depth - specs[0].top - 0.5 * s, **common)
            depth += height
        elif kind == "C":
            t = (label - 3) / 4.0
            depth += disc_above
            height = (13.0 + 2.0 * t) * s
            ax = (7.8 + 2.6 * t) * s
            spec = VertebraSpec(centre=depth + height / 2, top=depth, bottom=depth + height,
                                disc_above=disc_above, ax=ax, ay=(7.4 + 1.0 * t) * s,
                                cax=(11.8 + 0.4 * t) * s,
                                cay=(7.0 - 0.4 * t) * s, ring=3.8 * s,
                                spinous_len=[9.0, 10.0, 11.0, 14.0, 20.0][label - 3] * s,
                                spinous_half_w=2.2 * s, spinous_half_h=3.6 * s, spinous_slope=0.3 + 0.1 * t,
                                tp_len=ax + (11.0 + 4.0 * t) * s,
                                # C7's foramen is small or absent
                                foramen_r=2.5 * s if label < 7 else (1.3 * s if rng.random() < 0.5 else 0.0),
                                **common)
            depth += height
        else:
            j = label - 8
            depth += disc_above
            height = (16.5 + 1.3 * j) * s
            ax = (11.5 + 0.6 * j) * s
            spec = VertebraSpec(centre=depth + height / 2, top=depth, bottom=depth + height,
                                disc_above=disc_above, ax=ax, ay=(8.5 + 1.0 * j) * s, cax=8.0 * s,
                                cay=7.5 * s, ring=5.0 * s, spinous_len=(26.0 + 2.0 * j) * s,
                                spinous_half_w=2.6 * s, spinous_half_h=4.0 * s, spinous_slope=0.75,
                                tp_len=(29.0 + 1.0 * j) * s, foramen_r=0.0, **common)
            depth += height
        if specs:
            specs[-1].disc_below = spec.disc_above
        specs.append(spec)
    specs[-1].disc_below = u(4.5, 7.0) * scale
    # Head and neck windows end inside the last covered vertebra or its disc below: the next
    # vertebra never shows a sliver (its label would be a partial vertebra at the edge).
    last = specs[6 + n_thoracic]
    chest_end = last.bottom + min(margin_bottom, 0.8 * last.disc_below)
    anatomy_end = specs[-1].bottom + 0.8 * specs[-1].disc_below

    # Centre line (patient depth): lordosis between C2 and C7, flexion/lateral tilt (the head follows
    # it), thoracic kyphosis, axial twist.
    s_top, s_a, s_b = specs[0].top, specs[1].centre, specs[6].bottom
    s_mid = 0.5 * (s_top + anatomy_end)
    lordosis = u(-3.0, 12.0) * scale
    tilt_v = u(-0.2, 0.2)
    tilt_u = u(-0.06, 0.06)
    scoliosis = u(-3.0, 3.0)
    kyphosis = u(0.1, 0.3)
    theta0 = float(np.clip(rng.normal(0.0, 0.07), -0.2, 0.2))
    twist = u(-0.05, 0.05)
    x_frac, y_frac = u(-0.06, 0.06), u(-0.06, 0.04)

    kind = draw_fov_kind(cfg, fov_rng) if fov_kind is None else fov_kind
    window = plan_window(cfg, fov_rng, kind, skull_base=specs[0].top, chest_end=chest_end,
                         anatomy_end=anatomy_end)
    fov = window.ps * cfg.image_size
    patient_depth = window.top + (np.arange(window.nz) + 0.5) * window.dz
    arc = np.clip((patient_depth - s_a) / (s_b - s_a), 0.0, 1.0)
    spine_arc = np.clip((patient_depth - s_top) / (anatomy_end - s_top), 0.0, 1.0)
    cy = (fov * (0.5 + y_frac) - 5.0 + tilt_v * (patient_depth - s_mid) - lordosis * np.sin(np.pi * arc)
          + kyphosis * np.clip(patient_depth - s_b, 0.0, None) ** 2 / 80.0)
    cx = fov * (0.5 + x_frac) + tilt_u * (patient_depth - s_mid) + scoliosis * np.sin(np.pi * spine_arc)
    theta = theta0 + twist * (patient_depth - s_mid) / 100.0
    grid = StudyGrid(nz=window.nz, size=cfg.image_size, dz=window.dz, ps=window.ps, cx=cx, cy=cy, theta=theta)
    for spec in specs:  # patient depth → depth below the top of the scan
        spec.centre -= window.top
        spec.top -= window.top
        spec.bottom -= window.top
    params = {"scale": scale, "benign_rate": benign_rate, "fov": fov, "n_thoracic": n_thoracic,
              "chest_end": chest_end - window.top}
    return Skeleton(vertebrae=specs, grid=grid, total_depth=window.length, skull_base=specs[0].top,
                    window=window, head_scale=head_scale, params=params)


def _vertebra_parts(spec: VertebraSpec, u: np.ndarray, v: np.ndarray, h: np.ndarray,
                    compression: tuple[float, float] | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Implicit shapes of one vertebra: ``(parts, holes)`` boolean masks on the block."""
    s = spec.scale
    au = np.abs(u)
    parts: dict[str, np.ndarray] = {}
    if spec.kind == "C1":
        ring_r = ellipse(u, v, 0.0, 8.0 * s, 19.0 * s, 20.5 * s)
        inner_r = ellipse(u, v, 0.0, 8.0 * s, 14.0 * s, 15.5 * s)
        ring = (ring_r <= 1.0) & (inner_r > 1.0)
        arch_h = np.where(v < 2.0 * s, 4.5 * s, 3.8 * s)
        parts["anterior_arch"] = (ring & (v < 0.0) & (np.abs(h) <= arch_h)) | (
            ellipse(u, v, 0.0, -11.5 * s, 4.0 * s, 2.5 * s) + (h / (5.0 * s)) ** 2 <= 1.0)
        parts["posterior_arch"] = (ring & (v > 12.0 * s) & (np.abs(h - 0.5 * s) <= arch_h)) | (
            ellipse(u, v, 0.0, 28.0 * s, 4.0 * s, 3.0 * s) + ((h - 0.5 * s) / (4.5 * s)) ** 2 <= 1.0)
        mass = ellipse(au, v, 12.5 * s, 2.5 * s, 6.5 * s, 8.5 * s) + (h / (5.5 * s)) ** 2 <= 1.0
        side_ring = ring & (v >= 0.0) & (v <= 12.0 * s) & (np.abs(h) <= 5.0 * s)
        tp = (au >= 14.0 * s) & (au <= spec.tp_len) & (np.abs(v - 3.0 * s) <= 4.0 * s) & (
            np.abs(h) <= 3.8 * s)
        parts["lateral_mass"] = mass | side_ring
        parts["processes"] = tp
        holes = ellipse(au, v, 22.0 * s, 3.0 * s, spec.foramen_r, spec.foramen_r) <= 1.0
        return parts, holes

    height = spec.height
    # A superellipse: vertebral bodies are rounded rectangles in axial section, not ellipses.
    rb = np.abs(u / spec.ax) ** 2.6 + np.abs(v / spec.ay) ** 2.6
    inside = np.clip(1.0 - rb, 0.0, 1.0)
    top = -height / 2 + 0.6 * s * inside  # endplates are slightly concave
    bottom = height / 2 - 0.6 * s * inside
    if spec.kind == "C":
        # Uncinate processes lift the postero-lateral rims; the anterior-inferior lip hangs down.
        top = top - 2.2 * s * np.clip((au / spec.ax - 0.72) / 0.28, 0.0, 1.0) * (v > -0.4 * spec.ay)
        bottom = bottom + 1.5 * s * np.clip((-v / spec.ay - 0.55) / 0.45, 0.0, 1.0)
    if compression is not None:
        loss, posterior_share = compression
        anterior_weight = np.clip((spec.ay - v) / (2 * spec.ay), 0.0, 1.0)
        top = top + loss * height * (posterior_share + (1.0 - posterior_share) * anterior_weight)
    parts["body"] = (rb <= 1.0) & (h >= top) & (h <= bottom)

    vc = spec.canal_v
    outer = ellipse(u, v, 0.0, vc, spec.cax + spec.ring, spec.cay + spec.ring) <= 1.0
    canal = ellipse(u, v, 0.0, vc, spec.cax, spec.cay) <= 1.0
    ring_h0 = 0.05 * height
    ring_band = np.abs(h - ring_h0 - 0.25 * (v - vc)) <= (0.33 if spec.kind != "T" else 0.3) * height
    posterior = outer & ~canal & ring_band

    # Articular pillars; the joint planes between neighbours slope down posteriorly (facet joints).
    pv = vc - 0.5 * spec.cay
    if spec.kind == "T":
        pillar = ellipse(au, v, spec.cax + 0.5 * spec.ring, pv, 3.6 * s, 4.2 * s) <= 1.0
    else:
        pillar = ellipse(au, v, spec.cax + 0.45 * spec.ring, pv, 4.6 * s, 5.5 * s) <= 1.0
    joint_slope = 0.7 * (v - pv)
    pillar_top = (0.0 if spec.kind == "C2" else -height / 2 - spec.disc_above / 2 + 0.8 * s) + joint_slope
    pillar_bottom = height / 2 + spec.disc_below / 2 - 0.8 * s + joint_slope
    posterior |= pillar & (h >= pillar_top) & (h <= pillar_bottom)

    # Spinous process, sloping inferiorly, with a tubercle at the tip (bifid from C2 to C5).
    v0 = vc + spec.cay + 0.5 * spec.ring
    along = v - v0
    centre_h = ring_h0 + 0.25 * (spec.cay + 0.5 * spec.ring) + spec.spinous_slope * along
    half_w = spec.spinous_half_w * (1.0 + 0.4 * np.clip((along - spec.spinous_len + 4 * s) / (4 * s), 0, 1))
    half_h = spec.spinous_half_h * (1.0 - 0.3 * np.clip(along / spec.spinous_len, 0.0, 1.0))
    spinous = (along >= -spec.ring) & (along <= spec.spinous_len) & (au <= half_w) & (
        np.abs(h - centre_h) <= half_h)
    if spec.label <= 5:
        spinous &= ~((along > spec.spinous_len - 3.5 * s) & (au < 0.9 * s))
    processes = spinous

    holes = np.zeros(np.broadcast_shapes(u.shape, h.shape), dtype=bool)
    if spec.kind == "T":
        start = (spec.cax + 2.0 * s, vc - 1.0 * s)
        end = (spec.tp_len, vc - 1.0 * s + 0.45 * (spec.tp_len - start[0]))
        tp_dist, _ = segment_distance(au, v, np.array([start, end]))
        processes = processes | ((tp_dist <= 4.5 * s) & (np.abs(h + 0.05 * height) <= 5.0 * s))
    else:
        v_t = 0.15 * spec.ay
        tp = (au >= 0.6 * spec.ax) & (au <= spec.tp_len) & (
            np.abs(v - v_t + 0.08 * (au - spec.ax)) <= 3.8 * s) & (np.abs(h + 0.05 * height) <= 3.2 * s)
        processes = processes | tp
        if spec.foramen_r > 0:
            radius = spec.foramen_r
            holes = ellipse(au, v, spec.ax + 5.2 * s, v_t - 0.08 * 5.2 * s, radius, radius) <= 1.0
    parts["posterior"] = posterior
    parts["processes"] = processes

    if spec.kind == "C2":
        above = -(h + height / 2)  # height above the body's top
        radius = 4.8 * s * (1.0 - 0.2 * np.clip(above / spec.dens_height, 0.0, 1.0))
        tip = np.clip((above - (spec.dens_height - 4.0 * s)) / (4.0 * s), 0.0, 1.0)
        radius = radius * np.sqrt(1.0 - tip**2)
        parts["dens"] = (above >= -1.0 * s) & (above <= spec.dens_height) & (
            np.hypot(u, v - 0.5 * s) <= radius)
        shoulders = (ellipse(au, v, 12.5 * s, 2.5 * s, 6.2 * s, 7.5 * s) <= 1.0) & (
            h >= -height / 2 - 2.5 * s) & (h <= -height / 2 + 5.0 * s)
        parts["posterior"] = parts["posterior"] | shoulders
    return parts, holes


def build_vertebra(spec: VertebraSpec, grid: StudyGrid,
                   compression: tuple[float, float] | None = None) -> BoneBlock | None:
    """Masks and HU of one vertebra (and its rib stubs) in its own block of the grid.

    Args:
        spec: the vertebra.
        grid: the study grid.
        compression: ``(height_loss, posterior_share)`` of a compression fracture, or None.

    Returns:
        The block, or None when the vertebra lies outside the volume.
    """
    top, bottom, u_max, v_min, v_max = spec.local_extent()
    box = grid.box(top, bottom, (-u_max, u_max), (v_min, v_max), theta_extra=spec.theta)
    if box is None:
        return None
    u, v = grid.local(box, theta_extra=spec.theta)
    h = grid.depth_from(box, spec.centre)
    parts, holes = _vertebra_parts(spec, u, v, h, compression)
    bone = np.zeros(box.shape, dtype=bool)
    for mask in parts.values():
        bone |= mask
    bone &= ~holes
    hu = bone_density(grid, box, bone, spec.hu_cancellous, spec.hu_cortex, spec.cortical_mm,
                      spec.texture_seed)
    block = BoneBlock(spec=spec, box=box, bone=bone, hu=hu,
                      parts={name: mask & bone for name, mask in parts.items()})
    if spec.has_body:
        _benign_variations(block, grid, u, v, h)
    return block


def _benign_variations(block: BoneBlock, grid: StudyGrid, u: np.ndarray, v: np.ndarray,
                       h: np.ndarray) -> None:
    """Non-fracture findings that negatives may carry too: osteophytes, sclerosis, islands, channels."""
    spec = block.spec
    s = spec.scale
    rng = np.random.default_rng(spec.benign_seed)
    draws = rng.random(4)
    params = rng.uniform(size=8)
    height = spec.height
    body = block.parts["body"]
    if draws[0] < spec.benign_rate:  # osteophyte on an anterior endplate rim
        radius = (1.5 + 1.7 * params[0]) * s
        rim_h = (-1.0 if params[1] < 0.5 else 1.0) * height / 2
        spur = ellipse(u, v, (params[2] - 0.5) * 1.2 * spec.ax, -spec.ay + 0.3 * radius, 1.3 * radius,
                       radius) + ((h - rim_h) / (0.9 * radius)) ** 2 <= 1.0
        new = spur & ~block.bone
        block.bone |= spur
        block.hu[new] = spec.hu_cortex
    if draws[1] < spec.benign_rate:  # endplate sclerosis
        band = (1.5 + 1.5 * params[3]) * s
        edge = -height / 2 if params[4] < 0.5 else height / 2
        zone = body & (np.abs(h - edge) <= band)
        block.hu[zone] = np.maximum(block.hu[zone], spec.hu_cancellous + 150.0 + 200.0 * params[5])
    if draws[2] < spec.benign_rate * 0.5:  # bone island
        radius = (1.2 + 1.6 * params[6]) * s
        island = (np.sqrt(ellipse(u, v, 0.3 * spec.ax * (params[7] - 0.5), 0.0, 1.0, 1.0) + h**2)
                  <= radius) & body
        block.hu[island] = 900.0 + 400.0 * params[6]
    if draws[3] < spec.benign_rate:  # basivertebral venous channel: a normal posterior-wall gap
        radius = (0.7 + 0.4 * params[2]) * s
        channel = body & (u**2 + h**2 <= radius**2) & (v >= 0.15 * spec.ay)
        block.hu[channel] = np.maximum(block.hu[channel] - (120.0 + 100.0 * params[5]), 60.0)

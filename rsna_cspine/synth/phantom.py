"""One synthetic head-and-neck CT study: HU volume, tissue map, vertebra labels, fracture ground truth."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError
from rsna_cspine.synth.artefacts import metal_streaks, narrow_blur
from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.face import paint_face, plan_teeth
from rsna_cspine.synth.fov import draw_fov_kind
from rsna_cspine.synth.fractures import FracturePlan, apply_fracture, fracture_mask, plan_fracture
from rsna_cspine.synth.head import paint_cranium, plan_head
from rsna_cspine.synth.labels import sample_fracture_labels
from rsna_cspine.synth.neck import airway, paint_neck
from rsna_cspine.synth.shoulders import arm_ellipses, paint_lungs, paint_ribs, paint_shoulder_bones, plan_shoulders
from rsna_cspine.synth.skeleton import BoneBlock, build_vertebra, plan_skeleton
from rsna_cspine.synth.soft_tissue import body_ellipses, paint_soft_tissue
from rsna_cspine.synth.tissues import Painter, Tissue, draw_tissue_hu

#: HU stored outside the reconstruction circle of studies with a circular field of view.
PADDING_HU = -2048
#: Range every other voxel is clipped to (what a 12-bit unsigned series with intercept −1024 holds).
HU_RANGE = (-1024, 3071)
#: Fewest defect pixels on a slice for it to get a bounding box.
MIN_BOX_PIXELS = 2
#: Independent random streams of a study, and which one draws the field of view (``study_fov_kind``).
_N_STREAMS, _FOV_STREAM = 6, 4


@dataclass
class Phantom:
    """A synthetic study in the project's axis convention.

    Attributes:
        hu: int16 ``(z, y, x)``, z superior→inferior, rows anterior→posterior.
        labels: uint8 ``(z, y, x)``; 1..7 = C1..C7, 8.. = T1.., 0 = background (other bone too).
        spacing: ``(dz, dy, dx)`` mm.
        fractured: ``{"C1": 0/1, ..., "C7": 0/1}``; a fractured vertebra whose defect lies outside the
            scan (a ``slab`` window) counts as 0: nothing in the study shows it.
        fracture_boxes: ``{"z", "x", "y", "width", "height", "vertebra"}`` per slice (index ``z``)
            where a defect is visible; pixel box of the defect with a small margin.
        fracture_masks: bool ``(z, y, x)`` defect voxels per fractured vertebra.
        fracture_kinds: per fractured vertebra, what was done (``"break:body"``, ``"displaced"``, …).
        fracture_plans: per fractured vertebra, the drawn defects, displacement and height loss (what a
            severity grade is read from).
        circular_fov: True when pixels outside the reconstruction circle hold ``PADDING_HU``.
        tissue: uint8 ``(z, y, x)`` ``tissues.Tissue`` of every voxel (before artefacts; None if absent).
        fov: the scan window's kind (``fov.FOV_KINDS``).
        scan_top_mm: depth of the scan's upper edge below the vertex of the patient's skin (mm).
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    fractured: dict[str, int]
    fracture_boxes: list[dict]
    fracture_masks: dict[str, np.ndarray] | None
    fracture_kinds: dict[str, list[str]] = field(default_factory=dict)
    fracture_plans: dict[str, FracturePlan] = field(default_factory=dict)
    circular_fov: bool = False
    tissue: np.ndarray | None = None
    fov: str = "neck"
    scan_top_mm: float = 0.0

    @property
    def patient_overall(self) -> int:
        return int(any(self.fractured.values()))


def make_phantom(cfg: SynthConfig, rng: np.random.Generator,
                 fractured: dict[str, int] | None = None, fov: str | None = None) -> Phantom:
    """Generate one study.

    The generator splits ``rng`` into independent streams (anatomy, labels, fractures, noise, field of
    view, artefacts), so passing the same seed with ``fractured`` switched on or off for one vertebra
    yields twins that differ only around that vertebra's defects, and forcing another ``fov`` scans the
    same patient through another window.

    Args:
        cfg: generator settings.
        rng: the study's random generator.
        fractured: force these labels (missing vertebrae = 0); None draws them from the real
            prevalences times ``cfg.prevalence_scale``.
        fov: force the window kind (``"head"``, ``"neck"``, ``"slab"``); None draws it.

    Returns:
        The phantom.
    """
    seeds = rng.integers(0, 2**62, size=_N_STREAMS)
    anatomy_rng, label_rng, fracture_rng, noise_rng, fov_rng, artefact_rng = (
        np.random.default_rng(int(s)) for s in seeds)
    if fractured is None:
        fractured = sample_fracture_labels(label_rng, cfg.prevalence_scale)
    else:
        unknown = sorted(set(fractured) - set(VERTEBRAE))
        if unknown:
            raise ConfigError(f"fractured names unknown vertebrae {unknown}; expected names from {VERTEBRAE}")
        fractured = {name: int(bool(fractured.get(name, 0))) for name in VERTEBRAE}

    skeleton = plan_skeleton(cfg, anatomy_rng, fov_rng, fov)
    grid = skeleton.grid
    u_ = anatomy_rng.uniform
    noise_sd = u_(*cfg.noise_hu)
    smoothing = u_(*cfg.smoothing_voxels)
    circular = bool(anatomy_rng.random() < cfg.circular_fov_fraction)
    fov_radius = u_(0.93, 1.0) * cfg.image_size / 2
    habitus = u_(*cfg.body_habitus)
    airway_scale = u_(0.75, 1.2)
    painter = Painter(grid.shape, draw_tissue_hu(anatomy_rng, anatomy_rng.random() < cfg.contrast_fraction))
    head = plan_head(skeleton, anatomy_rng)
    teeth = plan_teeth(anatomy_rng, cfg.dental_metal_fraction)
    shoulders = plan_shoulders(skeleton, cfg.arms_fraction if cfg.shoulder_anatomy else 0.0, anatomy_rng)

    ellipses = body_ellipses(skeleton, head if cfg.head_anatomy else None, habitus,
                             arm_ellipses(skeleton, shoulders, habitus))
    soft = paint_soft_tissue(painter, skeleton, ellipses, anatomy_rng, habitus)
    paint_lungs(painter, skeleton, shoulders, habitus)
    paint_neck(painter, skeleton, airway(skeleton, airway_scale, soft["ay"]), anatomy_rng)
    if cfg.head_anatomy:
        paint_cranium(painter, skeleton, head)
        paint_face(painter, skeleton, head, teeth)
    if cfg.shoulder_anatomy:
        paint_shoulder_bones(painter, skeleton, shoulders)

    labels = np.zeros(grid.shape, dtype=np.uint8)
    fracture_seeds = fracture_rng.integers(0, 2**62, size=len(VERTEBRAE))
    blocks: list[BoneBlock] = []
    masks: dict[str, np.ndarray] = {}
    kinds: dict[str, list[str]] = {}
    plans: dict[str, FracturePlan] = {}
    for spec in skeleton.vertebrae:
        block = build_vertebra(spec, grid)
        if block is None:
            continue
        if fractured.get(spec.name, 0):
            plan = plan_fracture(block, grid, cfg, np.random.default_rng(int(fracture_seeds[spec.label - 1])))
            broken = build_vertebra(spec, grid, plan.compression)
            apply_fracture(broken, plan, grid)
            full = np.zeros(grid.shape, dtype=bool)
            full[block.box.index] = fracture_mask(block, broken)
            masks[spec.name] = full
            kinds[spec.name] = plan.kinds
            plans[spec.name] = plan
            block = broken
        blocks.append(block)
    for block in blocks:  # ribs first: where a rib touches a vertebra, the vertebra wins
        if block.spec.kind == "T":
            paint_ribs(painter, grid, block.spec)
    for block in blocks:
        painter.fill(block.box.index, block.bone, Tissue.VERTEBRA, block.hu)
        labels[block.box.index][block.bone] = block.spec.label

    # Metal streaks, partial volume, then scanner noise (stronger through the shoulders), integer HU.
    hu = painter.hu
    metal_streaks(hu, painter.tissue == Tissue.METAL, grid, artefact_rng)
    for axis, sigma in ((0, 0.5 * smoothing), (1, smoothing), (2, smoothing)):
        hu = narrow_blur(hu, sigma, axis)
    shoulder_gain = 1.0 + 0.6 * np.clip((grid.depth - soft["shoulder_depth"]) / 30.0, 0.0, 1.0)
    noise = noise_rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= (noise_sd * shoulder_gain).astype(np.float32)[:, None, None]
    hu += noise
    np.rint(hu, out=hu)
    np.clip(hu, *HU_RANGE, out=hu)
    out = hu.astype(np.int16)
    if circular:
        centre = (cfg.image_size - 1) / 2
        yy, xx = np.ogrid[: cfg.image_size, : cfg.image_size]
        outside = (yy - centre) ** 2 + (xx - centre) ** 2 > fov_radius**2
        out[:, outside] = PADDING_HU
        labels[:, outside] = 0
        for mask in masks.values():
            mask[:, outside] = False

    # A defect the scan does not show cannot be read from it (slabs may cut a fractured vertebra off).
    for name in [n for n, mask in masks.items() if not mask.any()] + [n for n in VERTEBRAE if fractured[n]
                                                                          and n not in masks]:
        fractured[name] = 0
        masks.pop(name, None)
        kinds.pop(name, None)
        plans.pop(name, None)
    return Phantom(hu=out, labels=labels, spacing=grid.spacing, fractured=fractured,
                   fracture_boxes=_boxes(masks, grid.ps), fracture_masks=masks, fracture_kinds=kinds,
                   fracture_plans=plans,                   circular_fov=circular, tissue=painter.tissue, fov=skeleton.window.kind,
                   scan_top_mm=skeleton.window.top)


def study_fov_kind(cfg: SynthConfig, rng: np.random.Generator) -> str:
    """The window kind ``make_phantom(cfg, rng)`` will draw, without consuming ``rng``."""
    seeds = copy.deepcopy(rng).integers(0, 2**62, size=_N_STREAMS)
    return draw_fov_kind(cfg, np.random.default_rng(int(seeds[_FOV_STREAM])))


def _boxes(masks: dict[str, np.ndarray], pixel_mm: float) -> list[dict]:
    """Per slice and fractured vertebra, the pixel box around the visible defect (1.5 mm margin)."""
    pad = max(2, int(round(1.5 / pixel_mm)))
    boxes: list[dict] = []
    for name in sorted(masks):
        mask = masks[name]
        for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
            rows, cols = np.nonzero(mask[z])
            if len(rows) < MIN_BOX_PIXELS:
                continue
            size_y, size_x = mask.shape[1:]
            x0, x1 = max(0, cols.min() - pad), min(size_x - 1, cols.max() + pad)
            y0, y1 = max(0, rows.min() - pad), min(size_y - 1, rows.max() + pad)
            boxes.append({"z": int(z), "x": int(x0), "y": int(y0), "width": int(x1 - x0 + 1),
                          "height": int(y1 - y0 + 1), "vertebra": name})
    boxes.sort(key=lambda b: (b["z"], b["vertebra"]))
    return boxes

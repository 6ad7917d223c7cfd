"""One synthetic neck CT study: HU volume, vertebra labels and fracture ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError
from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.fractures import apply_fracture, fracture_mask, plan_fracture
from rsna_cspine.synth.labels import sample_fracture_labels
from rsna_cspine.synth.skeleton import BoneBlock, build_other_bones, build_vertebra, plan_skeleton
from rsna_cspine.synth.soft_tissue import paint_soft_tissue

#: HU stored outside the reconstruction circle of studies with a circular field of view.
PADDING_HU = -2048
#: Range every other voxel is clipped to (what a 12-bit unsigned series with intercept −1024 holds).
HU_RANGE = (-1024, 3071)
#: Fewest defect pixels on a slice for it to get a bounding box.
MIN_BOX_PIXELS = 2


@dataclass
class Phantom:
    """A synthetic study in the project's axis convention.

    Attributes:
        hu: int16 ``(z, y, x)``, z superior→inferior (C1 near the top), rows anterior→posterior.
        labels: uint8 ``(z, y, x)``; 1..7 = C1..C7, 8.. = T1.., 0 = background (other bone too).
        spacing: ``(dz, dy, dx)`` mm.
        fractured: ``{"C1": 0/1, ..., "C7": 0/1}``.
        fracture_boxes: ``{"z", "x", "y", "width", "height", "vertebra"}`` per slice (index ``z``)
            where a defect is visible; pixel box of the defect with a small margin.
        fracture_masks: bool ``(z, y, x)`` defect voxels per fractured vertebra.
        fracture_kinds: per fractured vertebra, what was done (``"break:body"``, ``"displaced"``, …).
        circular_fov: True when pixels outside the reconstruction circle hold ``PADDING_HU``.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    fractured: dict[str, int]
    fracture_boxes: list[dict]
    fracture_masks: dict[str, np.ndarray] | None
    fracture_kinds: dict[str, list[str]] = field(default_factory=dict)
    circular_fov: bool = False

    @property
    def patient_overall(self) -> int:
        return int(any(self.fractured.values()))


def make_phantom(cfg: SynthConfig, rng: np.random.Generator,
                 fractured: dict[str, int] | None = None) -> Phantom:
    """Generate one study.

    The generator splits ``rng`` into independent streams (anatomy, labels, fractures, noise), so
    passing the same seed with ``fractured`` switched on or off for one vertebra yields twins that
    differ only around that vertebra's defects.

    Args:
        cfg: generator settings.
        rng: the study's random generator.
        fractured: force these labels (missing vertebrae = 0); None draws them from the real
            prevalences times ``cfg.prevalence_scale``.

    Returns:
        The phantom.
    """
    seeds = rng.integers(0, 2**62, size=4)
    anatomy_rng, label_rng, fracture_rng, noise_rng = (np.random.default_rng(int(s)) for s in seeds)
    if fractured is None:
        fractured = sample_fracture_labels(label_rng, cfg.prevalence_scale)
    else:
        unknown = sorted(set(fractured) - set(VERTEBRAE))
        if unknown:
            raise ConfigError(f"fractured names unknown vertebrae {unknown}; expected names from {VERTEBRAE}")
        fractured = {name: int(bool(fractured.get(name, 0))) for name in VERTEBRAE}

    skeleton = plan_skeleton(cfg, anatomy_rng)
    grid = skeleton.grid
    noise_sd = anatomy_rng.uniform(*cfg.noise_hu)
    smoothing = anatomy_rng.uniform(*cfg.smoothing_voxels)
    circular = bool(anatomy_rng.random() < cfg.circular_fov_fraction)
    fov_radius = anatomy_rng.uniform(0.93, 1.0) * cfg.image_size / 2

    hu = np.empty(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    tissue = paint_soft_tissue(hu, skeleton, cfg, anatomy_rng)
    for box, mask, values in build_other_bones(skeleton, anatomy_rng):
        hu[box.index][mask] = values[mask]

    fracture_seeds = fracture_rng.integers(0, 2**62, size=len(VERTEBRAE))
    blocks: list[BoneBlock] = []
    masks: dict[str, np.ndarray] = {}
    kinds: dict[str, list[str]] = {}
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
            block = broken
        blocks.append(block)
    for block in blocks:  # ribs first: where a rib touches a vertebra, the vertebra wins
        for box, mask, values in block.ribs:
            hu[box.index][mask] = values[mask]
            labels[box.index][mask] = 0
    for block in blocks:
        hu[block.box.index][block.bone] = block.hu[block.bone]
        labels[block.box.index][block.bone] = block.spec.label

    # Partial volume, then scanner noise (stronger through the shoulders), then integer HU.
    for axis, sigma in ((0, 0.5 * smoothing), (1, smoothing), (2, smoothing)):
        hu = _narrow_blur(hu, sigma, axis)
    shoulder_gain = 1.0 + 0.6 * np.clip((grid.depth - tissue["shoulder_depth"]) / 30.0, 0.0, 1.0)
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

    return Phantom(hu=out, labels=labels, spacing=grid.spacing, fractured=fractured,
                   fracture_boxes=_boxes(masks, grid.ps), fracture_masks=masks, fracture_kinds=kinds,
                   circular_fov=circular)


def _narrow_blur(volume: np.ndarray, sigma: float, axis: int) -> np.ndarray:
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

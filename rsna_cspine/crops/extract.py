"""Per-vertebra 2.5D stacks: evenly spaced axial slices, each with its neighbours as channels.

For vertebra ``v`` (label ``v`` in the mask, 1..7 = C1..C7) the stack holds ``n_slices`` centre slices
spread evenly from the vertebra's first to its last axial slice. Each centre slice contributes
``channels`` planes (itself and ``channels // 2`` neighbours on each side, ``neighbour_step`` slices
apart), once per intensity window, plus optionally the vertebra's mask on the centre slice. Every
plane is cut with the same square box around the whole vertebra (margin added) and resized, so the
stack is spatially consistent from slice to slice and the sequence model sees one object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from rsna_cspine.constants import CERVICAL_LABELS, VERTEBRAE
from rsna_cspine.errors import ConfigError
from rsna_cspine.io.window import window_hu

#: Value used outside the image when a crop box reaches past the volume edge (air).
_PAD_HU = -1024.0
#: Crop settings that were removed, with the value a cache built before their removal recorded; such a
#: cache holds the same crops (benchmarks/results/evidence.md lists why each was removed).
RETIRED_CROP_SETTINGS: dict[str, object] = {"isolate": False}


@dataclass
class CropConfig:
    """How one vertebra becomes a ``(n_slices, in_chans, size, size)`` stack.

    Attributes:
        n_slices: centre slices per vertebra, evenly spaced over its axial extent.
        channels: planes per centre slice and window (odd: the slice and ``channels // 2`` neighbours each side).
        size: output height and width in pixels.
        margin: added around the vertebra's in-plane box on each side, as a fraction of the box size
            (``margin_unit="fraction"``) or in mm (``margin_unit="mm"``).
        margin_unit: ``"fraction"`` or ``"mm"``.
        max_side_mm: cap on the box side in mm, centred on the vertebra (0 = none). C1's transverse
            processes make its box ~1.5× as wide as C3's, which halves the resolution of its thin ring
            at a small ``size``; a cap keeps the ring and lateral masses and drops the process tips.
        add_mask_channel: append the vertebra's own mask on the centre slice as a last channel.
        windows: one or more ``(low, high)`` Hounsfield windows mapped to [0, 1]; each adds ``channels`` planes.
        neighbour_step: distance in slices between neighbouring planes (1 = adjacent slices).
        dtype: ``"uint8"`` (0..255, compact cache) or ``"float16"`` (0..1).
    """

    n_slices: int = 15
    channels: int = 5
    size: int = 224
    margin: float = 0.15
    margin_unit: str = "fraction"
    max_side_mm: float = 0.0
    add_mask_channel: bool = False
    windows: tuple[tuple[float, float], ...] = ((-400.0, 1500.0),)
    neighbour_step: int = 1
    dtype: str = "uint8"

    @property
    def in_chans(self) -> int:
        """Channels per centre slice as the model sees them."""
        return self.channels * len(self.windows) + int(self.add_mask_channel)

    @property
    def half_width(self) -> int:
        """Slices between a centre slice and its farthest neighbour plane."""
        return (self.channels // 2) * self.neighbour_step

    def validate(self) -> None:
        """Raise :class:`ConfigError` when a value cannot produce a stack."""
        if self.n_slices < 1 or self.size < 8:
            raise ConfigError(f"crop: n_slices must be ≥ 1 and size ≥ 8, got {self.n_slices}, {self.size}")
        if self.channels < 1 or self.channels % 2 == 0:
            raise ConfigError(f"crop.channels must be odd (centre ± neighbours), got {self.channels}")
        if self.neighbour_step < 1:
            raise ConfigError(f"crop.neighbour_step must be ≥ 1, got {self.neighbour_step}")
        if self.max_side_mm < 0:
            raise ConfigError(f"crop.max_side_mm must be ≥ 0 (0 = no cap), got {self.max_side_mm}")
        if self.margin < 0 or self.margin_unit not in ("fraction", "mm"):
            raise ConfigError(f"crop: margin must be ≥ 0 with unit fraction|mm, got {self.margin} {self.margin_unit}")
        if not self.windows or any(len(w) != 2 or w[1] <= w[0] for w in self.windows):
            raise ConfigError(f"crop.windows must be (low, high) pairs with high > low, got {self.windows}")
        if self.dtype not in ("uint8", "float16"):
            raise ConfigError(f"crop.dtype must be uint8 or float16, got {self.dtype}")


@dataclass
class VertebraCrops:
    """The seven stacks of one study.

    Attributes:
        images: ``(7, N, C, S, S)`` uint8 (0..255) or float16 (0..1); zeros for an absent vertebra.
        present: ``(7,)`` True where the mask has the vertebra.
        slice_index: ``(7, N)`` volume z index of each centre slice; -1 for an absent vertebra.
        z_range: ``(7, 2)`` first and last z index of the vertebra (inclusive); -1 when absent.
        boxes: ``(7, 4)`` crop square ``(y0, y1, x0, x1)`` in volume pixels (end exclusive; may reach past
            the image, where air was padded); -1 when absent.
        slice_labels: ``(7, N)`` per-centre-slice fracture evidence (1/0, -1 unknown); filled by the cache.
        box_maps: ``(7, N, S, S)`` uint8, 1 where a box that counts for the vertebra (see
            :func:`box_maps_from_boxes`) covers the crop; meaningful where ``slice_labels`` is known.
            Empty ``(0, ...)`` when not computed.
    """

    images: np.ndarray
    present: np.ndarray
    slice_index: np.ndarray
    z_range: np.ndarray
    boxes: np.ndarray
    slice_labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int8))
    box_maps: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), np.uint8))

    def __post_init__(self) -> None:
        if self.slice_labels.size == 0:
            self.slice_labels = np.full(self.slice_index.shape, -1, dtype=np.int8)
        if self.box_maps.size == 0:
            self.box_maps = np.zeros((*self.slice_index.shape, *self.images.shape[-2:]), dtype=np.uint8)

    @property
    def n_slices(self) -> int:
        return int(self.images.shape[1])

    def as_float(self, vertebra: int) -> np.ndarray:
        """One vertebra's stack as float32 in [0, 1] (what the classifier consumes).

        Args:
            vertebra: 0-based index (0 = C1).
        """
        return to_unit_float(self.images[vertebra])


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float16 0..1 → float32 0..1."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def _square_box(
    bbox: tuple[slice, slice], cfg: CropConfig, dy: float, dx: float
) -> tuple[int, int, int, int]:
    """Square (in mm) box around an in-plane bounding box, margin added; end-exclusive pixel bounds."""
    (ys, xs) = bbox
    h_mm, w_mm = (ys.stop - ys.start) * dy, (xs.stop - xs.start) * dx
    if cfg.margin_unit == "fraction":
        side_mm = max(h_mm, w_mm) * (1.0 + 2.0 * cfg.margin)
    else:
        side_mm = max(h_mm, w_mm) + 2.0 * cfg.margin
    if cfg.max_side_mm > 0:
        side_mm = min(side_mm, cfg.max_side_mm)
    cy, cx = (ys.start + ys.stop) / 2.0, (xs.start + xs.stop) / 2.0
    side_y, side_x = max(1, math.ceil(side_mm / dy)), max(1, math.ceil(side_mm / dx))
    y0, x0 = math.floor(cy - side_y / 2.0), math.floor(cx - side_x / 2.0)
    return y0, y0 + side_y, x0, x0 + side_x


def _cut(array: np.ndarray, z: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """``array[z, y0:y1, x0:x1]`` reading only the in-image part, the rest filled with ``fill``."""
    y0, y1, x0, x1 = box
    _, height, width = array.shape
    iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    out = np.full((len(z), y1 - y0, x1 - x0), fill, dtype=np.float32)
    if iy1 > iy0 and ix1 > ix0:
        out[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = array[z, iy0:iy1, ix0:ix1]
    return out


def _resize(planes: np.ndarray, size: int) -> torch.Tensor:
    """(P, h, w) float32 → (P, size, size); antialiased so thin cortical bone survives downsampling."""
    t = torch.from_numpy(planes)[None]
    antialias = planes.shape[1] > size or planes.shape[2] > size
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)[0]


def extract_vertebra_crops(
    hu: np.ndarray,
    mask: np.ndarray,
    cfg: CropConfig,
    spacing: tuple[float, float, float] | None = None,
) -> VertebraCrops:
    """Cut the 2.5D stack of every cervical vertebra of one study.

    Args:
        hu: ``(z, y, x)`` Hounsfield units (any real dtype; a memmap is read only where needed).
        mask: ``(z, y, x)`` integer labels aligned with ``hu`` (1..7 = C1..C7; other labels ignored).
        cfg: crop geometry and intensity settings.
        spacing: ``(dz, dy, dx)`` mm; needed for a mm margin and to make the box square in mm.
            Without it pixels are taken as square.

    Returns:
        The seven stacks; vertebrae absent from the mask are zeros with ``present`` False.
    """
    cfg.validate()
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be the same 3-D shape")
    if cfg.margin_unit == "mm" and spacing is None:
        raise ConfigError("crop.margin_unit='mm' needs the volume spacing")
    dy, dx = (1.0, 1.0) if spacing is None else (float(spacing[1]), float(spacing[2]))
    n_z = hu.shape[0]
    n, c, s = cfg.n_slices, cfg.in_chans, cfg.size
    dtype = np.uint8 if cfg.dtype == "uint8" else np.float16
    images = np.zeros((len(VERTEBRAE), n, c, s, s), dtype=dtype)
    present = np.zeros(len(VERTEBRAE), dtype=bool)
    slice_index = np.full((len(VERTEBRAE), n), -1, dtype=np.int32)
    z_range = np.full((len(VERTEBRAE), 2), -1, dtype=np.int32)
    boxes = np.full((len(VERTEBRAE), 4), -1, dtype=np.int32)
    offsets = (np.arange(cfg.channels) - cfg.channels // 2) * cfg.neighbour_step

    # One C pass over the mask gives every label's bounding box (labels above C7 are skipped).
    objects = ndimage.find_objects(np.asarray(mask), max_label=max(CERVICAL_LABELS))
    for i, label in enumerate(CERVICAL_LABELS):
        bbox = objects[label - 1] if label - 1 < len(objects) else None
        if bbox is None:
            continue
        z0, z1 = bbox[0].start, bbox[0].stop - 1
        centres = np.rint(np.linspace(z0, z1, n)).astype(np.int64)
        planes_z = np.clip(centres[:, None] + offsets[None, :], 0, n_z - 1)  # (N, channels)
        unique_z, inverse = np.unique(planes_z, return_inverse=True)
        box = _square_box(bbox[1:], cfg, dy, dx)
        block = _cut(hu, unique_z, box, _PAD_HU)
        per_window = []
        for window in cfg.windows:
            resized = _resize(window_hu(block, window), s)  # (U, S, S)
            per_window.append(resized[torch.from_numpy(inverse.reshape(n, cfg.channels))])  # (N, ch, S, S)
        stack = torch.cat(per_window, dim=1)
        if cfg.add_mask_channel:
            own = (_cut(mask, centres, box, 0) == label).astype(np.float32)
            stack = torch.cat([stack, _resize(own, s)[:, None]], dim=1)
        values = stack.clamp_(0.0, 1.0).numpy()
        images[i] = np.rint(values * 255.0).astype(np.uint8) if dtype == np.uint8 else values.astype(np.float16)
        present[i] = True
        slice_index[i] = centres
        z_range[i] = (z0, z1)
        boxes[i] = box
    return VertebraCrops(images=images, present=present, slice_index=slice_index, z_range=z_range, boxes=boxes)


def slice_labels_from_boxes(
    crops: VertebraCrops,
    box_z: np.ndarray | None,
    half_width: int,
    box_rects: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-centre-slice fracture evidence from a study's bounding boxes.

    A box counts for a vertebra when its slice lies inside the vertebra's z-range and, given the boxes'
    rectangles and the study's mask, when the rectangle touches that vertebra's voxels on its slice.
    C1 and C2 share slices (the dens rises inside the atlas ring), so by slice alone a dens fracture would
    also mark C1's slices; a box that touches no cervical vertebra at all (a mask that missed it) falls
    back to the slice rule. A centre slice is positive when a box that counts lies within ``half_width``
    of it; every other slice of a present vertebra is negative. Without boxes (``box_z`` None) nothing is
    known: all -1.

    Args:
        crops: the study's stacks (their ``slice_index`` and ``z_range`` are used).
        box_z: z index (volume array order) of every box of the study, or None when it has no boxes.
        half_width: the stack's reach in slices (``CropConfig.half_width``).
        box_rects: ``(len(box_z), 4)`` pixel rectangles ``(x, y, width, height)`` of the boxes, or None.
        mask: ``(z, y, x)`` labels the crops were cut from (needed with ``box_rects``).

    Returns:
        ``(7, N)`` int8 in {-1, 0, 1}.
    """
    labels = np.full(crops.slice_index.shape, -1, dtype=np.int8)
    if box_z is None:
        return labels
    for i, near in _boxes_near_centres(crops, box_z, half_width, box_rects, mask):
        labels[i] = near.any(axis=1).astype(np.int8)
    return labels


def box_maps_from_boxes(
    crops: VertebraCrops,
    box_z: np.ndarray | None,
    half_width: int,
    box_rects: np.ndarray | None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Where on each centre slice's crop the fracture is: the boxes' rectangles drawn into the crop.

    The boxes that count are those of :func:`slice_labels_from_boxes` (a box within ``half_width``
    slices of the centre, in the vertebra's z-range, touching its mask); each is mapped through the
    vertebra's crop square into ``S×S`` crop pixels. A slice whose label is 0 gets an empty map.

    Args:
        crops: the study's stacks (``slice_index``, ``z_range``, ``boxes``, image size are used).
        box_z: z index of every box, or None when the study has no boxes (all maps empty).
        half_width: the stack's reach in slices.
        box_rects: ``(len(box_z), 4)`` pixel rectangles ``(x, y, width, height)``, or None (all empty).
        mask: ``(z, y, x)`` labels the crops were cut from (for the touching rule; None = slice rule).

    Returns:
        ``(7, N, S, S)`` uint8 in {0, 1}.
    """
    size = crops.images.shape[-1]
    maps = np.zeros((*crops.slice_index.shape, size, size), dtype=np.uint8)
    if box_z is None or box_rects is None:
        return maps
    rects = np.asarray(box_rects, dtype=np.float64).reshape(-1, 4)
    for i, near in _boxes_near_centres(crops, box_z, half_width, rects, mask):
        y0, y1, x0, x1 = (float(v) for v in crops.boxes[i])
        scale_y, scale_x = size / (y1 - y0), size / (x1 - x0)
        for slot, box_rows in enumerate(near):
            for x, y, w, h in rects[np.flatnonzero(box_rows)]:
                r0, r1 = max(int(np.floor((y - y0) * scale_y)), 0), min(int(np.ceil((y + h - y0) * scale_y)), size)
                c0, c1 = max(int(np.floor((x - x0) * scale_x)), 0), min(int(np.ceil((x + w - x0) * scale_x)), size)
                maps[i, slot, r0:r1, c0:c1] = 1
    return maps


def _boxes_near_centres(
    crops: VertebraCrops,
    box_z: np.ndarray,
    half_width: int,
    box_rects: np.ndarray | None,
    mask: np.ndarray | None,
) -> list[tuple[int, np.ndarray]]:
    """For each present vertebra ``i``: ``(i, near)``, ``near[slot, k]`` True when box ``k`` counts for
    the vertebra and lies within ``half_width`` slices of centre slice ``slot``."""
    box_z = np.asarray(box_z, dtype=np.int64)
    touches = None  # (boxes, 7): which vertebrae each box's rectangle touches
    if box_rects is not None and mask is not None and len(box_z):
        touches = np.zeros((len(box_z), len(VERTEBRAE)), dtype=bool)
        for k, (z, (x, y, w, h)) in enumerate(zip(box_z, np.asarray(box_rects, dtype=np.float64))):
            if not 0 <= z < mask.shape[0]:
                continue
            y0, x0 = max(int(np.floor(y)), 0), max(int(np.floor(x)), 0)
            y1, x1 = int(np.ceil(y + h)), int(np.ceil(x + w))
            found = np.unique(np.asarray(mask[z, y0:y1, x0:x1]))
            touches[k] = [label in found for label in CERVICAL_LABELS]
        touches[~touches.any(axis=1)] = True  # touches no vertebra: keep the slice rule
    out = []
    for i in np.flatnonzero(crops.present):
        z0, z1 = crops.z_range[i]
        counts = (box_z >= z0) & (box_z <= z1)
        if touches is not None:
            counts &= touches[:, i]
        out.append((int(i), (np.abs(crops.slice_index[i][:, None] - box_z[None, :]) <= half_width) & counts[None, :]))
    return out

"""Per-vertebra 2.5D crops: extraction from a volume + mask, and the per-study crop cache."""

from __future__ import annotations

from rsna_cspine.crops.cache import build_crop_cache, crop_path, load_crops, load_vertebra_stack, save_crops
from rsna_cspine.crops.extract import (
    CropConfig,
    VertebraCrops,
    extract_vertebra_crops,
    slice_labels_from_boxes,
    box_maps_from_boxes,
    to_unit_float,
)

__all__ = [
    "CropConfig",
    "VertebraCrops",
    "build_crop_cache",
    "crop_path",
    "extract_vertebra_crops",
    "load_crops",
    "load_vertebra_stack",
    "save_crops",
    "slice_labels_from_boxes",
    "box_maps_from_boxes",
    "to_unit_float",
]

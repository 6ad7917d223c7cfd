"""Stage 1: MONAI 3-D UNet segmentation of the cervical vertebrae C1..C7."""

from __future__ import annotations

from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.evaluate import evaluate_segmentation
from rsna_cspine.seg.predict import SegmentationResult, Segmenter, load_segmenter, predict_studies
from rsna_cspine.seg.preprocess import cache_training_study, preprocess_volume
from rsna_cspine.seg.train import fit_segmentation, train_segmentation

__all__ = [
    "SegConfig",
    "SegmentationResult",
    "Segmenter",
    "cache_training_study",
    "evaluate_segmentation",
    "fit_segmentation",
    "load_segmenter",
    "predict_studies",
    "preprocess_volume",
    "train_segmentation",
]

"""Stage 1: find the cervical spine (the cascade's localiser), segment C1..C7 around it with a MONAI 3-D UNet,
and check the anatomy of what was labelled."""

from __future__ import annotations

from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.evaluate import evaluate_segmentation
from rsna_cspine.seg.localise import Localiser, NeckLocation
from rsna_cspine.seg.batch import predict_studies
from rsna_cspine.seg.predict import SegmentationResult, Segmenter, load_segmenter
from rsna_cspine.seg.preprocess import cache_training_study, preprocess_volume
from rsna_cspine.seg.qc import QCLimits, check_vertebrae, qc_summary
from rsna_cspine.seg.train import fit_segmentation, train_segmentation

__all__ = [
    "Localiser",
    "NeckLocation",
    "QCLimits",
    "SegConfig",
    "SegmentationResult",
    "Segmenter",
    "cache_training_study",
    "check_vertebrae",
    "evaluate_segmentation",
    "fit_segmentation",
    "load_segmenter",
    "predict_studies",
    "preprocess_volume",
    "qc_summary",
    "train_segmentation",
]

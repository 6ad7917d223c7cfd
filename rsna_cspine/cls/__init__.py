"""Stage 2: the per-vertebra fracture classifier (timm backbone + sequence head): config, model, data,
training and fold-ensemble inference."""

from __future__ import annotations

from rsna_cspine.cls.config import ClsAugConfig, ClsConfig, ClsDataConfig, ClsModelConfig, ClsTrainConfig
from rsna_cspine.cls.model import FractureClassifier, build_classifier

__all__ = [
    "ClsAugConfig",
    "ClsConfig",
    "ClsDataConfig",
    "ClsModelConfig",
    "ClsTrainConfig",
    "FractureClassifier",
    "build_classifier",
]

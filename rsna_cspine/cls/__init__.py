"""Stage 2: the per-vertebra fracture classifier (timm backbone + sequence head): config, model, data,
training and fold-ensemble inference."""

from __future__ import annotations

from rsna_cspine.cls.config import ClsAugConfig, ClsConfig, ClsDataConfig, ClsModelConfig, ClsOptimConfig
from rsna_cspine.cls.model import FractureClassifier, build_classifier

__all__ = [
    "ClsAugConfig",
    "ClsConfig",
    "ClsDataConfig",
    "ClsModelConfig",
    "ClsOptimConfig",
    "FractureClassifier",
    "build_classifier",
]

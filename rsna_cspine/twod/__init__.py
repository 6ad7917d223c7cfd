"""2D image classification mode: an image folder (one sub-folder per class, or a CSV of path,label) →
any timm backbone, trained with the stage-2 loop, with reports, Grad-CAM and a synthetic generator."""

from __future__ import annotations

from rsna_cspine.twod.config import TwoDConfig, TwoDDataConfig, TwoDModelConfig, TwoDSplitConfig

__all__ = ["TwoDConfig", "TwoDDataConfig", "TwoDModelConfig", "TwoDSplitConfig"]

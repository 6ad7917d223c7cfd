"""2D image classification mode: an image folder (one sub-folder per class, or a CSV of path,label, with
optional studies) → any timm backbone or torchvision's AlexNet / GoogLeNet, trained with the one training
loop, with reports per image and per study, Grad-CAM and saliency, synthetic radiographs, sagittal CT
slices from phantoms or labelled CT, and the 2D column U-Net whose mask can precede classification."""

from __future__ import annotations

from rsna_cspine.twod.config import TwoDConfig, TwoDDataConfig, TwoDModelConfig, TwoDSplitConfig

__all__ = ["TwoDConfig", "TwoDDataConfig", "TwoDModelConfig", "TwoDSplitConfig"]

"""Vanilla-gradient saliency (Simonyan et al. 2014) of a 2D classifier for one image, and its picture.

MONAI's :class:`monai.visualize.VanillaGrad` does the work: the gradient of the explained class's score
with respect to the input pixels. The map is its absolute value, the largest over the channels, scaled by
its own maximum. Unlike Grad-CAM it needs no feature stage, so every backbone (transformers included) has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import VanillaGrad

from rsna_cspine.twod.gradcam import explained_copy, save_map_overlay, scaled_to_peak
from rsna_cspine.twod.model import ExplainScores, ImageClassifier


@dataclass
class ImageSaliency:
    """Saliency of one image.

    Attributes:
        saliency: ``(H, W)`` float32 in [0, 1] (scaled by its own maximum).
        class_index: the class whose score was differentiated.
        probs: ``(K,)`` class probabilities of the image.
        peak: the largest absolute gradient (0: the score does not depend on the pixels).
    """

    saliency: np.ndarray
    class_index: int
    probs: np.ndarray
    peak: float


def image_saliency(model: ImageClassifier, image: np.ndarray | torch.Tensor, class_index: int | None = None) -> ImageSaliency:
    """Vanilla-gradient saliency of one ``(C, H, W)`` image in [0, 1].

    Args:
        model: the classifier (weights loaded); a copy is differentiated, the model stays untouched.
        image: the image as the model consumes it.
        class_index: class to explain; default the predicted one.
    """
    copied, x, probs, target = explained_copy(model, image, class_index)
    with torch.enable_grad():
        gradient = VanillaGrad(ExplainScores(copied))(x.clone(), index=target)[0]
    scaled, peak = scaled_to_peak(gradient.abs().amax(0).float())
    return ImageSaliency(saliency=scaled, class_index=target, probs=probs, peak=peak)


def save_saliency_overlay(image: np.ndarray, result: ImageSaliency, classes: list[str], path: str | Path) -> Path:
    """Write the image and its saliency map side by side (PNG).

    Args:
        image: ``(C, H, W)`` in [0, 1] (its channel mean is shown).
        result: from :func:`image_saliency`.
        classes: class names (the title names the explained class and its probability).
        path: destination PNG.
    """
    name = classes[result.class_index]
    title = f"saliency: {name} (p={result.probs[result.class_index]:.3f})"
    return save_map_overlay(image, result.saliency, title, path, cmap="hot", alpha=0.6)

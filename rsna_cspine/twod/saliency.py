"""Vanilla-gradient saliency (Simonyan et al. 2014) of a 2D classifier for one image, and its picture.

MONAI's :class:`monai.visualize.VanillaGrad` does the work: the gradient of the explained class's score
with respect to the input pixels. The map is its absolute value, the largest over the channels, scaled by
its own maximum. Unlike Grad-CAM it needs no feature stage, so every backbone (transformers included) has one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import VanillaGrad

from rsna_cspine.twod.gradcam import save_map_overlay
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
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image).float()
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(x.shape)}")
    copied = copy.deepcopy(model).eval()
    device = next(copied.parameters()).device
    x = x[None].to(device)
    with torch.no_grad():
        probs = copied.class_probs(copied(x))[0].cpu().numpy()
    target = int(probs.argmax()) if class_index is None else int(class_index)
    with torch.enable_grad():
        gradient = VanillaGrad(ExplainScores(copied))(x.clone(), index=target)[0]
    magnitude = gradient.abs().amax(0).float()
    peak = float(magnitude.max())
    scaled = magnitude / peak if peak > 0 else torch.zeros_like(magnitude)
    return ImageSaliency(saliency=scaled.cpu().numpy().astype(np.float32), class_index=target, probs=probs, peak=peak)


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

"""Grad-CAM of a 2D classifier for one image, and its overlay picture.

MONAI's :class:`monai.visualize.GradCAM` does the work on the backbone's last feature stage, found the
same way as for stage 2 (:func:`rsna_cspine.cls.model.last_stage_name`), so any timm CNN works, and the
torchvision trunks, which list their last stage the same way. A backbone whose stages give channels-last
maps (timm's Swin) has, in the explained copy only, a pair of transposes after that stage, so the hooked
output is the ``(B, C, H, W)`` map MONAI expects and the network computes what it did before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.visualize import GradCAM

from torch import nn

from rsna_cspine.cls.model import last_stage_name
from rsna_cspine.twod.model import ExplainScores, ImageClassifier


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _target_layer(model: ImageClassifier) -> str:
    """The hooked layer's name inside :class:`ExplainScores` (adapting a channels-last stage in place)."""
    stage = last_stage_name(model.backbone)
    if getattr(model.backbone, "output_fmt", "NCHW") == "NHWC":
        parent_name, _, child = stage.rpartition(".")
        parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
        setattr(parent, child, nn.Sequential(getattr(parent, child), _Permute(0, 3, 1, 2), _Permute(0, 2, 3, 1)))
        stage = f"{stage}.1"  # the channels-first view between the two transposes
    return f"model.backbone.{stage}"


@dataclass
class ImageCam:
    """Grad-CAM of one image.

    Attributes:
        cam: ``(H, W)`` float32 in [0, 1] at the input's resolution (scaled by its own maximum).
        class_index: the class whose logit was explained.
        probs: ``(K,)`` class probabilities of the image.
        peak: the largest raw Grad-CAM value (0: the model pointed at nothing).
    """

    cam: np.ndarray
    class_index: int
    probs: np.ndarray
    peak: float


def explained_copy(
    model: ImageClassifier, image: np.ndarray | torch.Tensor, class_index: int | None
) -> tuple[ImageClassifier, torch.Tensor, np.ndarray, int]:
    """What Grad-CAM and saliency both start from: a copy of ``model`` in eval mode (the model stays
    untouched), the ``(C, H, W)`` image as a batch of one on its device, the class probabilities and the
    class explained (``class_index``, default the predicted one).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image).float()
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(x.shape)}")
    copied = copy.deepcopy(model).eval()
    x = x[None].to(next(copied.parameters()).device)
    with torch.no_grad():
        probs = copied.class_probs(copied(x))[0].cpu().numpy()
    target = int(probs.argmax()) if class_index is None else int(class_index)
    return copied, x, probs, target


def scaled_to_peak(raw: torch.Tensor) -> tuple[np.ndarray, float]:
    """``raw`` divided by its maximum (all zeros when that is not positive), as float32, and the maximum."""
    peak = float(raw.max())
    scaled = raw / peak if peak > 0 else torch.zeros_like(raw)
    return scaled.cpu().numpy().astype(np.float32), peak


def image_gradcam(model: ImageClassifier, image: np.ndarray | torch.Tensor, class_index: int | None = None) -> ImageCam:
    """Grad-CAM of one ``(C, H, W)`` image in [0, 1].

    Args:
        model: the classifier (weights loaded); a copy carries MONAI's hooks, the model stays untouched.
        image: the image as the model consumes it.
        class_index: class to explain; default the predicted one.
    """
    hooked, x, probs, target = explained_copy(model, image, class_index)
    for parameter in hooked.parameters():
        parameter.requires_grad_(True)
    layer = _target_layer(hooked)
    # Identity post-processing: MONAI's default rescales (and inverts) the map; keep the raw values.
    cam = GradCAM(ExplainScores(hooked), target_layers=layer, postprocessing=lambda m: m)
    with torch.enable_grad():
        raw = cam(x, class_idx=target).detach()[0, 0]
    scaled, peak = scaled_to_peak(raw)
    return ImageCam(cam=scaled, class_index=target, probs=probs, peak=peak)


def save_map_overlay(image: np.ndarray, heat: np.ndarray, title: str, path: str | Path, cmap: str = "jet",
                     alpha: float = 0.45) -> Path:
    """Write the image and a [0, 1] map over it side by side (PNG); Grad-CAM and saliency share it.

    Args:
        image: ``(C, H, W)`` in [0, 1] (its channel mean is shown).
        heat: ``(H, W)`` map in [0, 1].
        title: the right panel's title.
        path: destination PNG.
        cmap: the map's colours.
        alpha: the map's opacity.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.asarray(image, dtype=np.float32).mean(0)
    fig = Figure(figsize=(8, 4.3))
    left, right = fig.subplots(1, 2)
    left.imshow(grey, cmap="gray", vmin=0, vmax=1)
    left.set_title("image")
    right.imshow(grey, cmap="gray", vmin=0, vmax=1)
    right.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    right.set_title(title)
    for ax in (left, right):
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_cam_overlay(image: np.ndarray, result: ImageCam, classes: list[str], path: str | Path) -> Path:
    """Write the image and its Grad-CAM side by side (PNG).

    Args:
        image: ``(C, H, W)`` in [0, 1] (its channel mean is shown).
        result: from :func:`image_gradcam`.
        classes: class names (the title names the explained class and its probability).
        path: destination PNG.
    """
    name = classes[result.class_index]
    title = f"Grad-CAM: {name} (p={result.probs[result.class_index]:.3f})"
    return save_map_overlay(image, result.cam, title, path)

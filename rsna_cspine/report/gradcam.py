"""Grad-CAM for the stage-2 classifier: where in each slice of a vertebra's stack the fracture logit looks.

MONAI's :class:`monai.visualize.GradCAM` does the work. It expects a module that maps a ``(B, C, H, W)``
batch to ``(B, classes)`` logits, while :class:`~rsna_cspine.cls.model.FractureClassifier` maps one
``(1, N, C, H, W)`` stack to one logit, so a small adapter presents the stack's N slices as MONAI's
batch: the hooked backbone stage then holds one activation map per slice, each weighted by the gradient
of the single vertebra logit, which is exactly Grad-CAM per slice for the sequence model.
The target is the backbone's last feature stage as timm reports it (``feature_info``), so any timm CNN
works without a per-architecture table.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from rsna_cspine.cls.model import last_stage_name
from rsna_cspine.errors import ConfigError


class _SlicesAsBatch(nn.Module):
    """``(N, C, H, W)`` slices of one stack → ``(1, 1)`` vertebra logit, the shape MONAI's GradCAM expects."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.classifier(slices[None])["logit"].reshape(1, 1)


@dataclass
class StackCam:
    """Grad-CAM of one vertebra's stack.

    Attributes:
        cam: ``(N, H, W)`` float32 in [0, 1], one map per slice at the stack's own resolution, scaled by
            the largest value over the whole stack (so slices can be compared with each other).
        logit: the vertebra logit averaged over the models.
        peak: the largest raw (unscaled) Grad-CAM value, 0 when the models saw nothing to point at.
    """

    cam: np.ndarray
    logit: float
    peak: float


class StackGradCAM:
    """Grad-CAM over one or more (fold) classifiers; their raw maps are averaged.

    Each model is copied once, so MONAI's hooks live on the copy and the models used for prediction
    stay untouched.

    Args:
        classifiers: ``FractureClassifier`` models (each with a timm ``backbone``), weights loaded.
        target_layer: stage name inside the backbone; default its last feature stage.
    """

    def __init__(self, classifiers: Sequence[nn.Module], target_layer: str | None = None) -> None:
        if not classifiers:
            raise ConfigError("Grad-CAM needs at least one classifier")
        self._cams: list[GradCAM] = []
        self._adapters: list[_SlicesAsBatch] = []
        for classifier in classifiers:
            adapter = _SlicesAsBatch(copy.deepcopy(classifier)).eval()
            for parameter in adapter.parameters():
                parameter.requires_grad_(True)
            layer = target_layer or last_stage_name(adapter.classifier.backbone)
            # Identity post-processing: MONAI's default rescales each slice to its own [0, 1] (and
            # inverts it), which would erase which slice matters most.
            cam = GradCAM(adapter, target_layers=f"classifier.backbone.{layer}", postprocessing=lambda m: m)
            self._adapters.append(adapter)
            self._cams.append(cam)
        self.target_layer = target_layer or last_stage_name(self._adapters[0].classifier.backbone)

    @property
    def device(self) -> torch.device:
        return next(self._adapters[0].parameters()).device

    def __call__(self, stack: np.ndarray | torch.Tensor) -> StackCam:
        """Grad-CAM of one stack.

        Args:
            stack: ``(N, C, H, W)`` float in [0, 1], as the classifier consumes it.

        Returns:
            The per-slice maps, upsampled to ``(H, W)`` with the crop's own orientation.
        """
        x = torch.as_tensor(np.asarray(stack, dtype=np.float32) if isinstance(stack, np.ndarray) else stack)
        if x.ndim != 4:
            raise ValueError(f"stack must be (N, C, H, W), got shape {tuple(x.shape)}")
        x = x.float().to(self.device)
        total = torch.zeros((x.shape[0], 1, *x.shape[2:]), device=self.device)
        logit = 0.0
        # cuDNN refuses the backward pass of an RNN in eval mode; the native kernels give the same maps.
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            for adapter, cam in zip(self._adapters, self._cams):
                total += cam(x, class_idx=0).detach()
                logit += float(cam.nn_module.score.detach())
                # The hooks keep the last activations and gradients: release them between stacks.
                cam.nn_module.activations.clear()
                cam.nn_module.gradients.clear()
                adapter.zero_grad(set_to_none=True)
        raw = (total / len(self._cams))[:, 0]
        peak = float(raw.max())
        scaled = raw / peak if peak > 0 else torch.zeros_like(raw)
        return StackCam(cam=scaled.cpu().numpy().astype(np.float32), logit=logit / len(self._cams), peak=peak)

"""Inference with a 2D checkpoint: one image → class probabilities, optionally with its Grad-CAM and
vanilla-gradient saliency pictures. The column mask a classifier was trained with (``data.mask_with``) is
rebuilt from its checkpoint and applied exactly as in training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rsna_cspine.config import config_from_checkpoint
from rsna_cspine.engine import load_checkpoint, resolve_device
from rsna_cspine.errors import CSpineError
from rsna_cspine.twod.config import TwoDConfig
from rsna_cspine.twod.data import read_image
from rsna_cspine.twod.gradcam import ImageCam, image_gradcam, save_cam_overlay
from rsna_cspine.twod.masking import ColumnMasker, masker_from_state
from rsna_cspine.twod.model import ImageClassifier, build_image_classifier
from rsna_cspine.twod.saliency import ImageSaliency, image_saliency, save_saliency_overlay


@dataclass
class ImagePredictor:
    """A trained 2D classifier with what it needs to read new images.

    Attributes:
        model: the classifier in eval mode.
        cfg: the training config (image size, channels, DICOM window).
        classes: class names in output order.
        device: where the model runs.
        masker: the column mask of ``data.mask_with``, or None.
    """

    model: ImageClassifier
    cfg: TwoDConfig
    classes: list[str]
    device: torch.device
    masker: ColumnMasker | None = None

    def load(self, path: str | Path) -> np.ndarray:
        """Decode an image exactly as in training (column mask included): ``(C, S, S)`` float32 in [0, 1]."""
        d = self.cfg.data
        image = read_image(path, d.in_chans, d.image_size, d.dicom_window)
        return self.masker(image) if self.masker is not None else image

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray) -> dict[str, float]:
        """Class → probability of one decoded image (they sum to 1)."""
        x = torch.from_numpy(np.asarray(image, dtype=np.float32))[None].to(self.device)
        probs = self.model.class_probs(self.model(x))[0].cpu().numpy()
        return {name: float(p) for name, p in zip(self.classes, probs)}

    def explain(self, image: np.ndarray, class_index: int | None = None) -> tuple[ImageCam | None, ImageSaliency]:
        """Grad-CAM (None when the backbone has no feature stage to hook) and saliency of one decoded image."""
        try:
            cam = image_gradcam(self.model, image, class_index)
        except CSpineError:
            cam = None
        return cam, image_saliency(self.model, image, class_index)


def load_image_classifier(checkpoint: str | Path, device: str | torch.device = "auto") -> ImagePredictor:
    """Rebuild a 2D classifier from its checkpoint alone (config and class names are stored in it).

    Args:
        checkpoint: ``best.pt`` / ``last.pt`` of a ``train-2d`` run.
        device: ``auto``, ``cpu``, ``cuda``, ... or a torch device.

    Raises:
        CSpineError: the file is not a ``train-2d`` checkpoint.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    state = load_checkpoint(checkpoint, map_location="cpu")
    classes = (state.get("extra") or {}).get("classes")
    if not classes or not isinstance(state.get("config"), dict):
        raise CSpineError("not a train-2d checkpoint (no class names or config in it)", checkpoint)
    cfg = config_from_checkpoint(TwoDConfig, state["config"], checkpoint)
    model = build_image_classifier(cfg, len(classes), load_pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CSpineError(f"weights do not fit the model its config describes ({exc})", checkpoint) from exc
    masker = None
    if cfg.data.mask_with:
        stored = state["extra"].get("column_mask")
        if stored is None:
            raise CSpineError("the config names data.mask_with but the checkpoint holds no column U-Net", checkpoint)
        masker = masker_from_state(stored, cfg.data.mask_mode, cfg.data.mask_margin)
    return ImagePredictor(model=model.to(device).eval(), cfg=cfg, classes=list(classes), device=device, masker=masker)


def predict_2d(
    image: str | Path,
    checkpoint: str | Path,
    cam_path: str | Path | None = None,
    device: str = "auto",
    saliency_path: str | Path | None = None,
) -> dict[str, float]:
    """Class probabilities of one image file; optionally write its Grad-CAM and saliency pictures.

    Args:
        image: PNG/JPEG/DICOM file.
        checkpoint: a ``train-2d`` checkpoint.
        cam_path: PNG to write the Grad-CAM overlay of the predicted class to; None = no CAM.
        device: ``auto``, ``cpu``, ``cuda``.
        saliency_path: PNG to write the vanilla-gradient saliency of the predicted class to; None = none.

    Returns:
        Class → probability, in the model's class order.
    """
    predictor = load_image_classifier(checkpoint, device)
    pixels = predictor.load(image)
    probs = predictor.probabilities(pixels)
    if cam_path is not None:
        save_cam_overlay(pixels, image_gradcam(predictor.model, pixels), predictor.classes, cam_path)
    if saliency_path is not None:
        save_saliency_overlay(pixels, image_saliency(predictor.model, pixels), predictor.classes, saliency_path)
    return probs

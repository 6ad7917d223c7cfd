"""The column mask of ``data.mask_with``: a trained 2D column U-Net keeps the vertebral column of every image
and removes the rest, before classification (training and prediction alike), as in the sagittal-CT thesis.

``overlay`` sets the pixels outside the predicted column (widened by ``data.mask_margin``) to 0; ``crop``
cuts the image to the column's bounding box (plus the margin) and resizes it back to its side. The U-Net's
weights and config are stored in the classifier's checkpoint (:func:`masker_state`), so a classifier
predicts without the U-Net's own file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from scipy import ndimage

from rsna_cspine.config import config_from_checkpoint
from rsna_cspine.engine.checkpoints import load_checkpoint
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.twod.seg_config import SegModelConfig2D, TwoDSegConfig

#: Foreground probability above which a pixel belongs to the column.
THRESHOLD = 0.5


def build_column_unet(cfg: SegModelConfig2D) -> UNet:
    """MONAI's 2D UNet: one grey channel in, background and column logits out (random init)."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=tuple(cfg.channels),
                strides=tuple(cfg.strides), num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout)


def apply_column_mask(image: np.ndarray, mask: np.ndarray, mode: str = "overlay", margin: float = 0.0) -> np.ndarray:
    """Keep the column of one image.

    Args:
        image: ``(C, S, S)`` in [0, 1].
        mask: ``(S, S)`` bool, the column.
        mode: ``overlay`` (zero outside the widened mask) or ``crop`` (bounding box plus margin, resized to ``S``).
        margin: widening / crop margin as a share of the side.

    Returns:
        The masked ``(C, S, S)`` float32 image; an empty mask leaves nothing (all zeros) in ``overlay`` and the
        whole image in ``crop``.
    """
    image = np.asarray(image, dtype=np.float32)
    side = image.shape[-1]
    pixels = int(round(margin * side))
    if mode == "overlay":
        # A square structuring element: the mask grows by ``pixels`` in every direction, corners included.
        square = np.ones((3, 3), dtype=bool)
        keep = ndimage.binary_dilation(mask, square, iterations=pixels) if pixels > 0 and mask.any() else mask
        return image * keep[None].astype(np.float32)
    if mode != "crop":
        raise ConfigError(f"mask mode must be overlay or crop, got {mode!r}")
    if not mask.any():
        return image
    rows, cols = np.nonzero(mask)
    r0, r1 = max(rows.min() - pixels, 0), min(rows.max() + pixels + 1, image.shape[-2])
    c0, c1 = max(cols.min() - pixels, 0), min(cols.max() + pixels + 1, side)
    box = torch.from_numpy(np.ascontiguousarray(image[:, r0:r1, c0:c1]))[None]
    resized = F.interpolate(box, size=image.shape[-2:], mode="bilinear", align_corners=False, antialias=True)[0]
    return resized.clamp_(0.0, 1.0).numpy()


@dataclass
class ColumnMasker:
    """A trained column U-Net and how its mask is applied; called on ``(C, S, S)`` images in [0, 1].

    Attributes:
        model: the U-Net in eval mode (on the CPU: it runs inside data loading).
        size: the U-Net's input side.
        mode: ``overlay`` or ``crop``.
        margin: widening / crop margin as a share of the side.
    """

    model: UNet
    size: int
    mode: str = "overlay"
    margin: float = 0.03

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """``(S, S)`` bool column mask of one ``(C, S, S)`` image (its channel mean is what the U-Net sees)."""
        grey = torch.from_numpy(np.asarray(image, dtype=np.float32).mean(0))[None, None]
        side = grey.shape[-2:]
        small = F.interpolate(grey, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        column = torch.softmax(self.model(small).float(), dim=1)[:, 1:2]
        return (F.interpolate(column, size=side, mode="bilinear", align_corners=False)[0, 0] > THRESHOLD).numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return apply_column_mask(image, self.predict(image), self.mode, self.margin)


def masker_state(checkpoint: str | Path) -> dict[str, Any]:
    """What a classifier checkpoint keeps of a ``train-2d-seg`` checkpoint: its weights, config and file name.

    Raises:
        CSpineError: the file is missing or is not a ``train-2d-seg`` checkpoint.
    """
    if not Path(checkpoint).is_file():
        raise ConfigError("data.mask_with: column U-Net checkpoint not found (train it with rsna-cspine "
                          "train-2d-seg)", checkpoint)
    state = load_checkpoint(checkpoint, map_location="cpu")
    if (state.get("extra") or {}).get("task") != "column_segmentation" or not isinstance(state.get("config"), dict):
        raise CSpineError("not a train-2d-seg checkpoint (data.mask_with needs one)", checkpoint)
    return {"model": state["model"], "config": state["config"], "source": str(checkpoint)}


def masker_from_state(state: dict[str, Any], mode: str, margin: float) -> ColumnMasker:
    """Rebuild the masker stored by :func:`masker_state`.

    Raises:
        CSpineError: the weights do not fit the U-Net their config describes.
    """
    cfg = config_from_checkpoint(TwoDSegConfig, state["config"], state.get("source"))
    model = build_column_unet(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CSpineError(f"column U-Net weights do not fit their config ({exc})", state.get("source")) from exc
    return ColumnMasker(model=model.eval(), size=cfg.data.image_size, mode=mode, margin=margin)

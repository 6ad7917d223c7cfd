"""Stage-1 network factory (a MONAI 3-D UNet or SegResNet built from the model config) and the one way the
fine network is run on a grid image, shared by validation and prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet, UNet

from rsna_cspine.errors import ConfigError
from rsna_cspine.seg.config import SegModelConfig, SegPredictConfig

MODEL_NAMES: tuple[str, ...] = ("unet", "segresnet")
BLEND_MODES: tuple[str, ...] = ("constant", "gaussian")


def build_model(cfg: SegModelConfig, out_channels: int, in_channels: int = 1) -> torch.nn.Module:
    """Create the segmentation network named by ``cfg.name`` (random init: no weights are downloaded).

    Args:
        cfg: model section of the config.
        out_channels: classes including background (8, or 9 with a thoracic class).
        in_channels: image channels (1: windowed HU).
    """
    if cfg.name == "unet":
        if len(cfg.strides) != len(cfg.channels) - 1:
            raise ConfigError(
                f"model.strides needs len(channels) - 1 = {len(cfg.channels) - 1} values, got {len(cfg.strides)}"
            )
        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
    if cfg.name == "segresnet":
        return SegResNet(
            spatial_dims=3,
            init_filters=cfg.init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=cfg.dropout or None,
            blocks_down=tuple(cfg.blocks_down),
            blocks_up=tuple(cfg.blocks_up),
        )
    raise ConfigError(f"model.name must be one of {MODEL_NAMES}, got {cfg.name!r}")


def grid_divisor(cfg: SegModelConfig) -> int:
    """The factor every grid side must be divisible by for the network's down/up-sampling to line up."""
    if cfg.name == "unet":
        factor = 1
        for s in cfg.strides:
            factor *= int(s)
        return factor
    return 2 ** (len(cfg.blocks_down) - 1)


def window_size(cfg: SegPredictConfig, grid: Sequence[int]) -> tuple[int, int, int]:
    """The sliding window of ``cfg.roi_size`` on ``grid``: 0 on an axis, or a size beyond the grid's (a small
    grid set on the command line, as training clamps its patch), is the grid's size."""
    if cfg.blend not in BLEND_MODES:
        raise ConfigError(f"predict.blend must be one of {BLEND_MODES}, got {cfg.blend!r}")
    if len(cfg.roi_size) != len(grid):
        raise ConfigError(f"predict.roi_size {list(cfg.roi_size)} needs one size per grid axis {list(grid)} "
                          "(0 = the whole axis)")
    return tuple(min(int(r), int(g)) if int(r) > 0 else int(g) for r, g in zip(cfg.roi_size, grid))  # type: ignore[return-value]


def window_logits(model: torch.nn.Module, image: torch.Tensor, cfg: SegPredictConfig, grid: Sequence[int]) -> torch.Tensor:
    """The network's logits over a ``(B, 1, D, H, W)`` grid image, in the sliding windows of ``cfg``.

    Validation and prediction both call this, so the epoch kept as best is chosen on the labels that
    prediction will give.

    Args:
        model: the fine network (in eval mode).
        image: preprocessed grid image(s).
        cfg: the predict section (``roi_size``, ``overlap``, ``blend``, ``sw_batch_size``).
        grid: the grid the network was trained on (``data.grid``).
    """
    return sliding_window_inference(image, roi_size=window_size(cfg, grid), sw_batch_size=cfg.sw_batch_size,
                                    predictor=model, overlap=cfg.overlap, mode=cfg.blend)

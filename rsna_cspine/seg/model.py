"""Stage-1 network factory: a MONAI 3-D UNet or SegResNet built from the model config."""

from __future__ import annotations

import torch
from monai.networks.nets import SegResNet, UNet

from rsna_cspine.errors import ConfigError
from rsna_cspine.seg.config import SegModelConfig

MODEL_NAMES: tuple[str, ...] = ("unet", "segresnet")


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

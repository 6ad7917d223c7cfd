"""Stage-2 model: a timm 2D backbone on every slice of a vertebra's stack, then a sequence head.

Input ``(B, N, C, H, W)``: B vertebrae, N slices each, C channels per slice (neighbouring planes,
windows, mask) in [0, 1]. The backbone embeds each slice; a bidirectional GRU/LSTM or attention pooling
reads the slice sequence and gives one fracture logit per vertebra, and optionally one per slice.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from rsna_cspine.cls.config import HEADS, ClsConfig
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError


def create_backbone(
    name: str,
    in_chans: int,
    num_classes: int = 0,
    pretrained_file: str | None = None,
    drop_path_rate: float = 0.0,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model from a local weights file or random init; nothing is ever downloaded.

    Args:
        name: any timm model name.
        in_chans: input channels; timm adapts a pretrained stem to them.
        num_classes: classifier outputs; 0 returns pooled pre-logits features.
        pretrained_file: local timm weights (``.pth``/``.safetensors``); None = random init.
        drop_path_rate: stochastic depth (0 = off, and not passed to models without it).
        global_pool: spatial pooling (timm name: ``avg``, ``max``, ``avgmax``, ...).
        drop_rate: dropout before the classifier (0 = off).
    """
    kwargs: dict[str, object] = {"in_chans": in_chans, "num_classes": num_classes, "global_pool": global_pool}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise ConfigError("pretrained weights file not found", pretrained_file)
        # timm loads the local file, adapts the stem to in_chans and drops a classifier whose size differs.
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    return timm.create_model(name, pretrained=bool(pretrained_file), **kwargs)


class FractureClassifier(nn.Module):
    """Slice encoder + sequence head → vertebra logit (and per-slice logits).

    Args:
        backbone: timm model name.
        in_chans: channels per slice (``CropConfig.in_chans``); timm adapts the stem to it.
        head: ``gru``, ``lstm`` or ``attention``.
        hidden: hidden size of the head.
        dropout: dropout before the output layers.
        slice_logits: add a per-slice output.
        pretrained_file: local timm weights (``.pth``/``.safetensors``); None = random init.
        drop_path_rate: stochastic depth in the backbone (0 = off).
        global_pool: the backbone's spatial pooling (timm name: ``avg``, ``max``, ``avgmax``, ...).
        vertebra_bias: add a learned logit offset per vertebra (zero at initialisation).
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        head: str = "gru",
        hidden: int = 256,
        dropout: float = 0.2,
        slice_logits: bool = True,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        vertebra_bias: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
        self.backbone = create_backbone(
            backbone, in_chans, num_classes=0, pretrained_file=pretrained_file, drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )
        # NHWC convolutions: ~20 % faster training steps on CPU (oneDNN), and the layout tensor cores want.
        self.backbone.to(memory_format=torch.channels_last)
        # With num_classes=0 timm returns pre-logits features: head_hidden_size where a model has a
        # pre-logits layer (e.g. MobileNetV3), num_features otherwise.
        features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.head_type = head
        if head == "attention":
            self.project = nn.Sequential(nn.Linear(features, hidden), nn.GELU())
            self.attention = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            sequence_dim, pooled_dim = hidden, hidden
        else:
            rnn = nn.GRU if head == "gru" else nn.LSTM
            self.rnn = rnn(features, hidden, batch_first=True, bidirectional=True)
            sequence_dim, pooled_dim = 2 * hidden, 4 * hidden  # mean ‖ max over slices
        self.dropout = nn.Dropout(dropout)
        self.vertebra_out = nn.Linear(pooled_dim, 1)
        self.slice_out = nn.Linear(sequence_dim, 1) if slice_logits else None
        self.vertebra_bias = nn.Embedding(len(VERTEBRAE), 1) if vertebra_bias else None
        if self.vertebra_bias is not None:
            nn.init.zeros_(self.vertebra_bias.weight)

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Score a batch of stacks.

        Args:
            x: ``(B, N, C, H, W)`` floats in [0, 1].
            vertebra: ``(B,)`` 0-based vertebra index (0 = C1) of each stack, for the per-vertebra
                offset; None leaves the offset out (Grad-CAM, where a constant does not matter).

        Returns:
            ``logit`` ``(B,)`` and ``slice_logits`` ``(B, N)`` (None without a slice output).
        """
        b, n = x.shape[:2]
        # Centre the [0, 1] input so a randomly initialised stem starts near its intended range.
        images = ((x.flatten(0, 1) - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
        per_slice = self.backbone(images).view(b, n, -1)
        if self.head_type == "attention":
            sequence = self.project(per_slice)
            weights = torch.softmax(self.attention(sequence).squeeze(-1), dim=1)
            pooled = (weights.unsqueeze(-1) * sequence).sum(1)
        else:
            sequence, _ = self.rnn(per_slice)
            pooled = torch.cat([sequence.mean(1), sequence.amax(1)], dim=-1)
        logit = self.vertebra_out(self.dropout(pooled)).squeeze(-1)
        if self.vertebra_bias is not None and vertebra is not None:
            logit = logit + self.vertebra_bias(vertebra.long()).squeeze(-1)
        slice_logits = None if self.slice_out is None else self.slice_out(self.dropout(sequence)).squeeze(-1)
        return {"logit": logit, "slice_logits": slice_logits}


def build_classifier(cfg: ClsConfig, load_pretrained: bool = True) -> FractureClassifier:
    """The model a config describes.

    Args:
        cfg: the run config (``in_chans`` follows from ``cfg.data.crop``).
        load_pretrained: read ``cfg.model.pretrained_file`` (off when a checkpoint will overwrite the weights).
    """
    m = cfg.model
    model = FractureClassifier(
        backbone=m.backbone,
        in_chans=cfg.data.crop.in_chans,
        head=m.head,
        hidden=m.hidden,
        dropout=m.dropout,
        slice_logits=m.slice_logits,
        pretrained_file=m.pretrained_file if load_pretrained else None,
        drop_path_rate=m.drop_path_rate,
        global_pool=m.global_pool,
        vertebra_bias=m.vertebra_bias,
    )
    if m.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return model

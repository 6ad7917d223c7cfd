"""Stage-2 model: a timm 2D backbone on every slice of a vertebra's stack, then a sequence head.

Input ``(B, N, C, H, W)``: B vertebrae, N slices each, C channels per slice (neighbouring planes,
windows, mask) in [0, 1]. The backbone embeds each slice; a bidirectional GRU/LSTM or attention pooling
reads the slice sequence and gives one fracture logit per vertebra, and optionally one per slice.

Pretrained weights come only from a local timm checkpoint (``model.pretrained_file``); with one, the
input is normalised with the backbone's own ``pretrained_cfg`` mean/std, and that normalisation is a
buffer of the model, so every checkpoint carries it (prediction never needs the weights file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from rsna_cspine.cls.config import HEADS, ClsConfig
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError

#: Input normalisation of models trained from random weights: centres [0, 1] on 0 with a spread near 1.
#: Checkpoints written before the normalisation was stored in the model all used it.
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25


def pretrained_hint(name: str, path: str | Path) -> str:
    """How to obtain the local weights file ``path`` for timm model ``name`` (for error messages).

    Args:
        name: timm model name, ideally with its pretrained tag (``resnet50.a1_in1k``).
        path: where the config expects the file.
    """
    try:
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    except (RuntimeError, AttributeError):  # unknown name: the model factory reports it later
        hub_id = f"timm/{name}"
    cache = f"~/.cache/huggingface/hub/models--{hub_id.replace('/', '--')}/snapshots/*/model.safetensors"
    return (
        f"nothing is downloaded at run time. On a machine with internet run\n"
        f"  python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
        f"and copy the file timm cached ({cache}) to {path}; on Kaggle, upload it as a dataset, attach it and "
        f"set model.pretrained_file=/kaggle/input/<dataset>/{Path(path).name}. "
        "model.pretrained_file=null trains from random weights instead."
    )


def check_pretrained_file(name: str, path: str | Path | None) -> None:
    """Fail early, before any data work, when a config names a weights file that is not there.

    Args:
        name: timm model name.
        path: ``model.pretrained_file``; None passes.

    Raises:
        ConfigError: the file does not exist (the message says how to get it).
    """
    if path and not Path(path).is_file():
        raise ConfigError(f"pretrained weights file not found (model.pretrained_file); {pretrained_hint(name, path)}",
                          path)


def pretrained_normalisation(pretrained_cfg: dict[str, Any], in_chans: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std for ``in_chans`` inputs from a timm ``pretrained_cfg`` (3-channel RGB stats).

    Mirrors timm's stem adaptation (``adapt_input_conv``): for more channels the RGB filters are repeated,
    channel ``i`` taking filter ``i % 3``, so channel ``i`` gets that colour's mean/std; a 1-channel stem
    sums the three filters, so it gets the average mean and std.

    Args:
        pretrained_cfg: the backbone's ``pretrained_cfg`` (``mean``, ``std``).
        in_chans: input channels of the adapted stem.
    """
    mean = [float(v) for v in pretrained_cfg.get("mean") or (SCRATCH_MEAN,) * 3]
    std = [float(v) for v in pretrained_cfg.get("std") or (SCRATCH_STD,) * 3]
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [mean[i % len(mean)] for i in range(in_chans)], [std[i % len(std)] for i in range(in_chans)]


class InputNormalisation(nn.Module):
    """``(x - mean) / std`` per channel of ``(B, C, H, W)`` images; mean and std are (saved) buffers.

    A buffer and not a config value, so that a checkpoint predicts exactly as it was trained, with or
    without the pretrained file and whatever the installed timm's ``pretrained_cfg`` says.

    Args:
        mean: one value per channel.
        std: one value per channel (all > 0).
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ConfigError(f"normalisation needs one mean and one positive std per channel; got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints from before this module held no mean/std: they were trained with the scratch
        # normalisation, whatever their config says (as BatchNorm fills num_batches_tracked for old ones).
        for key, value in (("mean", SCRATCH_MEAN), ("std", SCRATCH_STD)):
            if prefix + key not in state_dict:
                state_dict[prefix + key] = torch.full_like(getattr(self, key), value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def backbone_normalisation(backbone: nn.Module, in_chans: int, pretrained: bool) -> InputNormalisation:
    """The input normalisation of a timm backbone: its ``pretrained_cfg`` mean/std, or the scratch centring.

    Args:
        backbone: a model from :func:`create_backbone`.
        in_chans: its input channels.
        pretrained: use the pretrained statistics (the weights came, or will come, from a pretrained file).
    """
    if pretrained:
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        return InputNormalisation(*pretrained_normalisation(cfg, in_chans))
    return InputNormalisation([SCRATCH_MEAN] * in_chans, [SCRATCH_STD] * in_chans)


def create_backbone(
    name: str,
    in_chans: int,
    num_classes: int = 0,
    pretrained_file: str | None = None,
    drop_path_rate: float = 0.0,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model from a local weights file or random init; nothing is ever downloaded.

    Args:
        name: any timm model name; with a tag (``resnet50.a1_in1k``) its ``pretrained_cfg`` is that tag's.
        in_chans: input channels; timm adapts a pretrained stem to them.
        num_classes: classifier outputs; 0 returns pooled pre-logits features.
        pretrained_file: local timm weights (``.pth``/``.safetensors``, a plain state dict or one under
            ``state_dict``/``model``); None = random init.
        drop_path_rate: stochastic depth (0 = off, and not passed to models without it).
        global_pool: spatial pooling (timm name: ``avg``, ``max``, ``avgmax``, ...).
        drop_rate: dropout before the classifier (0 = off).
        img_size: input side, for models built for one size (Swin); None = the model's default.

    Raises:
        ConfigError: the file is absent, or its weights do not fit the model.
    """
    kwargs: dict[str, object] = {"in_chans": in_chans, "num_classes": num_classes, "global_pool": global_pool}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    if not pretrained_file:
        return timm.create_model(name, pretrained=False, **kwargs)
    check_pretrained_file(name, pretrained_file)
    # timm loads the local file, adapts the stem to in_chans and drops a classifier whose size differs.
    kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"weights do not fit timm model {name!r} (another architecture or variant?): "
                          f"{type(exc).__name__} {detail}", pretrained_file) from exc


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
        pretrained_norm: normalise the input with the backbone's ``pretrained_cfg`` mean/std (tiled over
            the channels) instead of the scratch centring; None = whenever ``pretrained_file`` is given.
            Stored in the weights, so a checkpoint overrides it.
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
        pretrained_norm: bool | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
        self.backbone = create_backbone(
            backbone, in_chans, num_classes=0, pretrained_file=pretrained_file, drop_path_rate=drop_path_rate,
            global_pool=global_pool,
        )
        use_pretrained_norm = bool(pretrained_file) if pretrained_norm is None else pretrained_norm
        self.input_norm = backbone_normalisation(self.backbone, in_chans, use_pretrained_norm)
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
            x: ``(B, N, C, H, W)`` floats in [0, 1] (normalised inside, see ``input_norm``).
            vertebra: ``(B,)`` 0-based vertebra index (0 = C1) of each stack, for the per-vertebra
                offset; None leaves the offset out (Grad-CAM, where a constant does not matter).

        Returns:
            ``logit`` ``(B,)`` and ``slice_logits`` ``(B, N)`` (None without a slice output).
        """
        b, n = x.shape[:2]
        images = self.input_norm(x.flatten(0, 1)).contiguous(memory_format=torch.channels_last)
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
        load_pretrained: read ``cfg.model.pretrained_file`` (off when a checkpoint will overwrite the weights;
            the normalisation still follows the config, and a checkpoint's stored one replaces it).
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
        pretrained_norm=m.pretrained_file is not None,
    )
    if m.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return model


def last_stage_name(backbone: nn.Module) -> str:
    """Name, inside ``backbone``, of its deepest feature stage (the Grad-CAM target).

    Args:
        backbone: a timm model (it lists its stages in ``feature_info``).

    Raises:
        ConfigError: the model reports no feature stages (e.g. a ViT without spatial feature maps).
    """
    info = getattr(backbone, "feature_info", None)
    names = [entry["module"] for entry in info] if info else []
    modules = dict(backbone.named_modules())
    if not names or names[-1] not in modules:
        raise ConfigError(f"{backbone.__class__.__name__} lists no feature stage to take a Grad-CAM from")
    return str(names[-1])

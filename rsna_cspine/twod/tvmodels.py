"""torchvision backbones of the 2D mode (``model.backbone: tv/alexnet`` or ``tv/googlenet``), as feature
trunks for a new head, with weights only from a local file.

timm has neither network, so they come from torchvision, built with ``weights=None`` (nothing is downloaded)
and filled from ``model.pretrained_file``: a torchvision state dict (``.pth``, e.g. ``alexnet-owt-7be5be79.pth``
from torch's hub cache) or a ``.safetensors`` file, read by timm's loader. The final ImageNet layer (and
GoogLeNet's auxiliary heads) are left out: the trunk ends in AlexNet's 4096 fc7 features or GoogLeNet's 1024
pooled features, and the 2D classifier puts its head on top. Each trunk carries what the rest of the 2D
mode reads from timm models: ``pretrained_cfg`` (ImageNet mean/std, so the input normalisation is the one the
weights expect) and ``feature_info`` (the last convolutional stage, for Grad-CAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from torch import nn
from torchvision import models

from rsna_cspine.errors import ConfigError

PREFIX = "tv/"


@dataclass(frozen=True)
class _Spec:
    """How one torchvision network becomes a trunk."""

    dropped: tuple[str, ...]  # state-dict prefixes of the layers the trunk leaves out
    last_stage: str  # module name of the Grad-CAM target
    stage_channels: int
    features: int  # width of the trunk's output
    weights: str  # torchvision's ImageNet weights enum member, for the how-to message


SPECS: dict[str, _Spec] = {
    "alexnet": _Spec(("classifier.6.",), "features.11", 256, 4096, "AlexNet_Weights.IMAGENET1K_V1"),
    "googlenet": _Spec(("aux1.", "aux2.", "fc."), "inception5b", 1024, 1024, "GoogLeNet_Weights.IMAGENET1K_V1"),
}


def is_torchvision(name: str) -> bool:
    """Whether ``model.backbone`` names a torchvision network."""
    return name.startswith(PREFIX)


def _spec(name: str) -> tuple[str, _Spec]:
    short = name[len(PREFIX):]
    if short not in SPECS:
        raise ConfigError(f"unknown torchvision backbone {name!r}; offered: {', '.join(PREFIX + k for k in SPECS)}")
    return short, SPECS[short]


def weights_hint(name: str, path: str | Path) -> str:
    """How to obtain the local weights file for a torchvision backbone (for error messages)."""
    short, spec = _spec(name)
    return (
        "nothing is downloaded at run time. On a machine with internet run\n"
        f"  python -c \"import torch, torchvision.models as m; "
        f"torch.save(m.{short}(weights=m.{spec.weights}).state_dict(), '{Path(path).name}')\"\n"
        f"and copy the file to {path}. model.pretrained_file=null trains from random weights instead."
    )


def check_weights_file(name: str, path: str | Path | None) -> None:
    """Fail before any data work when a torchvision backbone's weights file is named but absent."""
    if path and not Path(path).is_file():
        raise ConfigError(f"pretrained weights file not found (model.pretrained_file); {weights_hint(name, path)}",
                          path)


def create_trunk(name: str, in_chans: int, pretrained_file: str | None = None,
                 imagenet_input: bool | None = None) -> tuple[nn.Module, int]:
    """A torchvision network without its ImageNet layer, and the width of its output features.

    Args:
        name: ``tv/alexnet`` or ``tv/googlenet``.
        in_chans: must be 3 (grey images are repeated to RGB, as the published systems did).
        pretrained_file: local state dict; None = random init.
        imagenet_input: the network runs on ImageNet weights (GoogLeNet then converts its input as they
            expect); None = whenever ``pretrained_file`` is given. A checkpoint rebuilt without the file
            passes what its training run used.

    Raises:
        ConfigError: an unknown name, another channel count, a missing file, or weights that do not fit.
    """
    short, spec = _spec(name)
    if in_chans != 3:
        raise ConfigError(f"{name} takes RGB input: set data.in_chans=3 (grey images are repeated), got {in_chans}")
    if short == "alexnet":
        trunk: nn.Module = models.alexnet(weights=None)
        trunk.classifier = trunk.classifier[:-1]  # keep fc6 and fc7 (4096 features), drop the 1000-way fc8
        if not pretrained_file:
            kaiming_init(trunk)
    else:
        # The ImageNet weights were ported from TensorFlow and expect transform_input (which maps an
        # ImageNet-normalised input to their [-1, 1] scale); a trunk trained from scratch does without.
        imagenet = bool(pretrained_file) if imagenet_input is None else imagenet_input
        trunk = models.googlenet(weights=None, aux_logits=False, init_weights=not pretrained_file,
                                 transform_input=imagenet)
        trunk.fc = nn.Identity()
    for module in trunk.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # Grad-CAM's hooks read the activations that an in-place ReLU would overwrite
    if pretrained_file:
        _load_weights(trunk, name, spec, pretrained_file)
    trunk.pretrained_cfg = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    trunk.feature_info = [{"module": spec.last_stage, "num_chs": spec.stage_channels}]
    return trunk, spec.features


def kaiming_init(module: nn.Module) -> None:
    """He (Kaiming-normal) initialisation of every convolution and linear layer, biases zero.

    torchvision builds AlexNet with PyTorch's default layer init (uniform, a third of He's variance) and no
    batch norm, so each of its seven ReLU layers shrinks the signal: from random weights the fc7 features
    come out several hundred times smaller than with He's init (SD ~0.01 against ~4 at 64 px), and a run
    at a fine-tuning learning rate stayed at ln 3. He's init keeps the variance through ReLU layers
    (He et al. 2015). A trunk filled from ``pretrained_file`` keeps its weights.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _load_weights(trunk: nn.Module, name: str, spec: _Spec, path: str) -> None:
    check_weights_file(name, path)
    try:
        state = load_state_dict(str(path), use_ema=False)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"unreadable weights file for {name} ({type(exc).__name__}: {exc})", path) from exc
    kept = {k: v for k, v in state.items() if not k.startswith(spec.dropped)}
    try:
        result = trunk.load_state_dict(kept, strict=False)
    except RuntimeError as exc:
        detail = (str(exc).strip().splitlines() or [""])[-1].strip()
        raise ConfigError(f"weights do not fit {name}: {detail}", path) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"weights do not fit {name}: missing {result.missing_keys[:4]}, unexpected "
                          f"{result.unexpected_keys[:4]} (another network?)", path)


@torch.no_grad()
def trunk_features(trunk: nn.Module, size: int = 64) -> int:
    """The width of a trunk's output, measured (a check of :data:`SPECS` in the tests)."""
    trunk.eval()
    return int(trunk(torch.zeros(1, 3, size, size)).shape[1])

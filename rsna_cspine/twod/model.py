"""2D classifier: a timm or torchvision backbone with a class head, on ``(B, C, H, W)`` images in [0, 1].

The input normalisation is stage 2's: the backbone's ``pretrained_cfg`` mean/std with a pretrained file, the
scratch centring without, kept as a buffer of the model so that checkpoints carry it. The head is the
backbone's own linear classifier (timm, resized to the classes) or two new fully connected layers with
dropout (``model.head: fc2``; always so for torchvision backbones). With ``model.ordinal`` the head gives one
score and the model adds ordered thresholds (CORAL: Cao, Mirjalili and Raschka 2020): output ``k`` is the
logit of "class > k", and the class probabilities are the differences of their sigmoids.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from rsna_cspine.cls.model import backbone_normalisation, check_pretrained_file, create_backbone
from rsna_cspine.errors import ConfigError
from rsna_cspine.twod.config import TwoDConfig
from rsna_cspine.twod.tvmodels import check_weights_file, create_trunk, is_torchvision


def fc2_head(features: int, n_out: int, hidden: int, dropout: float) -> nn.Sequential:
    """Two new fully connected layers: dropout → ``features``→``hidden`` → ReLU → dropout → ``hidden``→``n_out``."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, n_out))


def init_new_classifier(layer: nn.Linear) -> None:
    """Small normal weights (SD 0.01) and zero bias for a classifier layer that starts untrained.

    timm's EfficientNet / MobileNet init scales a linear layer by its *output* width (Google's init), so a
    2-class classifier over 1280 features starts with logits of SD ~4: the first epochs go into shrinking
    them (training loss 5 for two classes) instead of into the task. Every new head starts near uniform.
    """
    nn.init.normal_(layer.weight, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _fixed_input_size(name: str) -> bool:
    """Whether a timm model is built for one input size (Swin: its windows and position tables)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, AttributeError):
        return False
    return bool(cfg is not None and cfg.fixed_input_size)


def check_backbone_weights(name: str, path: str | None) -> None:
    """Fail before any data work when ``model.pretrained_file`` names a missing file (with how to get it)."""
    (check_weights_file if is_torchvision(name) else check_pretrained_file)(name, path)


def ordinal_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K-1)`` logits of "class > k" → ``(B, K)`` class probabilities.

    CORAL's shared score keeps the cumulative probabilities ordered once its thresholds are; the clamp and
    renormalisation only guard the first steps of training, before they are.
    """
    above = torch.sigmoid(logits.float())
    ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
    cumulative = torch.cat([ones, above, zeros], dim=1)  # P(class > k) for k = -1 .. K-1
    probs = (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(0.0)
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)


class ImageClassifier(nn.Module):
    """A classifier that takes [0, 1] images and returns ``(B, K)`` logits (``(B, K-1)`` when ordinal).

    The plain tensor output is what MONAI's Grad-CAM and VanillaGrad expect; :meth:`explain_scores` gives
    per-class scores for them whatever the output kind.

    Args:
        backbone: timm model name, or ``tv/alexnet`` / ``tv/googlenet``.
        in_chans: 1 or 3 (torchvision backbones: 3).
        n_classes: number of classes.
        pretrained_file: local weights; None = random init.
        drop_rate: dropout before the classifier (``fc2``: before each of its layers).
        drop_path_rate: stochastic depth.
        global_pool: timm pooling name.
        pretrained_norm: normalise with the backbone's ``pretrained_cfg`` mean/std; None = whenever
            ``pretrained_file`` is given (a checkpoint's stored normalisation replaces it).
        head: ``linear`` or ``fc2``.
        head_hidden: width of ``fc2``'s first layer.
        ordinal: CORAL output (one score, ``n_classes - 1`` ordered thresholds).
        image_size: the input side, passed to timm models built for one size (Swin).
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        n_classes: int,
        pretrained_file: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        pretrained_norm: bool | None = None,
        head: str = "linear",
        head_hidden: int = 256,
        ordinal: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if ordinal and n_classes < 3:
            raise ConfigError(f"model.ordinal needs at least three ordered classes, got {n_classes}")
        self.n_classes, self.ordinal = n_classes, ordinal
        n_out = 1 if ordinal else n_classes
        use_pretrained_norm = bool(pretrained_file) if pretrained_norm is None else pretrained_norm
        extra = {"img_size": image_size} if image_size and _fixed_input_size(backbone) else {}
        if is_torchvision(backbone):
            self.backbone, features = create_trunk(backbone, in_chans, pretrained_file, imagenet_input=use_pretrained_norm)
            self.head: nn.Module = fc2_head(features, n_out, head_hidden, drop_rate) if head == "fc2" else nn.Sequential(
                nn.Dropout(drop_rate), nn.Linear(features, n_out))
        elif head == "fc2":
            self.backbone = create_backbone(backbone, in_chans, num_classes=0, pretrained_file=pretrained_file,
                                            drop_path_rate=drop_path_rate, global_pool=global_pool, **extra)
            features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
            self.head = fc2_head(features, n_out, head_hidden, drop_rate)
        else:
            self.backbone = create_backbone(
                backbone, in_chans, num_classes=n_out, pretrained_file=pretrained_file, drop_path_rate=drop_path_rate,
                global_pool=global_pool, drop_rate=drop_rate, **extra,
            )
            self.head = nn.Identity()  # timm's own classifier is the head (and no key of older checkpoints moves)
            classifier = self.backbone.get_classifier()
            if isinstance(classifier, nn.Linear):
                init_new_classifier(classifier)
        if ordinal:
            # Decreasing thresholds: P(class > k) starts ordered, as CORAL's rank consistency needs.
            self.ordinal_bias = nn.Parameter(torch.linspace(1.0, -1.0, n_classes - 1))
        self.input_norm = backbone_normalisation(self.backbone, in_chans, use_pretrained_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``(B, C, H, W)`` images in [0, 1]."""
        out = self.head(self.backbone(self.input_norm(x)))
        return out + self.ordinal_bias if self.ordinal else out

    def class_probs(self, outputs: torch.Tensor) -> torch.Tensor:
        """Forward outputs → ``(B, K)`` class probabilities (softmax, or the ordinal differences)."""
        return ordinal_probs(outputs) if self.ordinal else torch.softmax(outputs.float(), dim=1)

    def explain_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` per-class scores that saliency and Grad-CAM differentiate: the logits, or for an
        ordinal model the log class probabilities (its outputs are thresholds, not classes)."""
        out = self(x)
        return torch.log(self.class_probs(out).clamp_min(1e-12)) if self.ordinal else out


class ExplainScores(nn.Module):
    """``model.explain_scores`` as a module's forward (MONAI's Grad-CAM and VanillaGrad call ``model(x)``)."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.explain_scores(x)


def build_image_classifier(cfg: TwoDConfig, n_classes: int, load_pretrained: bool = True) -> ImageClassifier:
    """The model a config describes.

    Args:
        cfg: the run config.
        n_classes: number of classes (from the data, or from a checkpoint).
        load_pretrained: read ``cfg.model.pretrained_file`` (off when a checkpoint will overwrite the weights).
    """
    m = cfg.model
    return ImageClassifier(
        m.backbone, cfg.data.in_chans, n_classes, pretrained_file=m.pretrained_file if load_pretrained else None,
        drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, global_pool=m.global_pool,
        pretrained_norm=m.pretrained_file is not None, head=m.head, head_hidden=m.head_hidden, ordinal=m.ordinal,
        image_size=cfg.data.image_size,
    )

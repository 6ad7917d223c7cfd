"""2D classifier: stage 2's timm backbone factory with a class head, on ``(B, C, H, W)`` images in [0, 1].

The input normalisation is stage 2's: the backbone's ``pretrained_cfg`` mean/std with a pretrained file, the
scratch centring without, kept as a buffer of the model so that checkpoints carry it.
"""

from __future__ import annotations

import torch
from torch import nn

from rsna_cspine.cls.model import backbone_normalisation, create_backbone
from rsna_cspine.twod.config import TwoDConfig


class ImageClassifier(nn.Module):
    """A timm classifier that takes [0, 1] images and returns ``(B, n_classes)`` logits.

    The plain tensor output is what MONAI's Grad-CAM expects, so no adapter is needed for it.

    Args:
        backbone: timm model name.
        in_chans: 1 or 3.
        n_classes: number of classes.
        pretrained_file: local timm weights; None = random init.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth.
        global_pool: timm pooling name.
        pretrained_norm: normalise with the backbone's ``pretrained_cfg`` mean/std; None = whenever
            ``pretrained_file`` is given (a checkpoint's stored normalisation replaces it).
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
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone, in_chans, num_classes=n_classes, pretrained_file=pretrained_file, drop_path_rate=drop_path_rate,
            global_pool=global_pool, drop_rate=drop_rate,
        )
        use_pretrained_norm = bool(pretrained_file) if pretrained_norm is None else pretrained_norm
        self.input_norm = backbone_normalisation(self.backbone, in_chans, use_pretrained_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``(B, C, H, W)`` images in [0, 1]."""
        return self.backbone(self.input_norm(x))


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
        pretrained_norm=m.pretrained_file is not None,
    )

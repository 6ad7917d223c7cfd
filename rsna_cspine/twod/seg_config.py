"""Typed config of ``train-2d-seg``: a 2D MONAI UNet that finds the vertebral column on sagittal slices.

Same shape as every other stage (``run_dir, fold, seed, device`` + ``data``, ``split``, ``model``, ``aug``,
``train``, ``optim``); the split is a holdout by study, so ``run_dir`` holds the run itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rsna_cspine.engine.folds import fold_run_dir
from rsna_cspine.errors import ConfigError
from rsna_cspine.training.config import ImageAugConfig, OptimConfig, RunConfig, TrainConfig


@dataclass
class SegDataConfig:
    """Where the image / mask pairs come from.

    Attributes:
        root: a CSV with ``path`` and ``mask`` columns (relative to the CSV; optional ``study``), e.g.
            ``synth-sagittal``'s or ``import-sagittal``'s ``labels.csv``; or a folder with ``images/`` and
            ``masks/`` holding the same relative file names.
        image_size: square side the images and masks are resized to (the network's input).
        dicom_window: HU window for DICOM images (None: per-image percentiles).
        in_memory: keep the decoded pairs in RAM.
    """

    root: str = "data/sagittal/labels.csv"
    image_size: int = 128
    dicom_window: tuple[float, float] | None = (-400.0, 1500.0)
    in_memory: bool = True


@dataclass
class SegSplitConfig:
    """Holdout by study.

    Attributes:
        val_fraction: share of the studies used for validation.
    """

    val_fraction: float = 0.2


@dataclass
class SegModelConfig2D:
    """MONAI ``UNet(spatial_dims=2)`` settings (one grey input channel; background and column outputs).

    Attributes:
        channels: feature channels per level.
        strides: down-sampling per level (one fewer than ``channels``).
        num_res_units: residual units per block.
        norm: normalisation layer name.
        dropout: dropout rate.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    norm: str = "batch"
    dropout: float = 0.0


@dataclass
class SegTrainConfig2D(TrainConfig):
    """The shared loop settings plus the Dice / cross-entropy weights.

    Attributes:
        lambda_dice: weight of the Dice loss.
        lambda_ce: weight of the cross-entropy.
    """

    epochs: int = 20
    batch_size: int = 16
    val_batch_size: int = 32
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0


@dataclass
class TwoDSegConfig(RunConfig):
    """Everything one ``train-2d-seg`` run uses; saved as ``config.yaml`` and in every checkpoint."""

    run_dir: str = "runs/twod_seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    split: SegSplitConfig = field(default_factory=SegSplitConfig)
    model: SegModelConfig2D = field(default_factory=SegModelConfig2D)
    aug: ImageAugConfig = field(default_factory=lambda: ImageAugConfig(hflip=0.0, vflip=0.0, rotate_deg=10.0))
    train: SegTrainConfig2D = field(default_factory=SegTrainConfig2D)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3))

    def fold_dir(self) -> Path:
        """``run_dir`` itself: one holdout split, no folds."""
        return fold_run_dir(self.run_dir, None)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot train."""
        self.train.validate()
        self.aug.validate()
        if not 0.0 < self.split.val_fraction < 1.0:
            raise ConfigError(f"split.val_fraction must be in (0, 1), got {self.split.val_fraction}")
        m = self.model
        if len(m.strides) != len(m.channels) - 1:
            raise ConfigError(f"model.strides needs len(channels) - 1 = {len(m.channels) - 1} values, got {len(m.strides)}")
        divisor = 1
        for stride in m.strides:
            divisor *= int(stride)
        if self.data.image_size < 16 or self.data.image_size % divisor:
            raise ConfigError(f"data.image_size must be ≥ 16 and a multiple of {divisor} (the strides' product), "
                              f"got {self.data.image_size}")
        window = self.data.dicom_window
        if window is not None and window[1] <= window[0]:
            raise ConfigError(f"data.dicom_window must be (low, high) with high > low, got {window}")

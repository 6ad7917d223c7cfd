"""Typed config of the 2D image-folder classifier (defaults ← YAML ← ``key=value`` overrides).

Its ``aug``, ``train`` and ``optim`` sections are the shared ones of ``rsna_cspine.training.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rsna_cspine.config import ANY_VALUE
from rsna_cspine.engine.folds import fold_run_dir
from rsna_cspine.errors import ConfigError
from rsna_cspine.training.config import FLAT_TRAIN_KEYS, ImageAugConfig, OptimConfig, RunConfig, TrainConfig

SPLIT_MODES: tuple[str, ...] = ("holdout", "kfold")
#: Validation metrics a run can monitor (``summary.csv`` columns); losses are minimised, the rest maximised.
MONITORS: tuple[str, ...] = (
    "val_loss", "val_accuracy", "val_precision", "val_recall", "val_specificity", "val_f1", "val_roc_auc",
)


@dataclass
class TwoDDataConfig:
    """Where the images come from and how they become tensors.

    Attributes:
        root: a folder with one sub-folder per class, or a CSV file of ``path,label`` (paths relative to
            the CSV's folder).
        in_chans: 1 (grey) or 3 (the grey image repeated, or RGB files kept in colour).
        image_size: square side the images are resized to.
        dicom_window: ``(low, high)`` HU window mapped to [0, 1] for DICOM files; None scales each DICOM
            between its 0.5th and 99.5th percentiles (radiographs have no Hounsfield scale).
        skip_unreadable: list unreadable images in a warning and train without them (default: stop with
            an error naming the file).
        in_memory: keep the decoded, resized images in RAM (they are decoded once anyway to check them);
            ``in_chans × image_size² × 4`` bytes each, so for small sets or small sizes.
        positive_class: the class binary metrics (precision, recall, specificity, F1, AUC) are about;
            None → the class that is not named like a negative (``normal``, ``negative``, ...), else the
            last one in sorted order.
    """

    root: str = "data/images"
    in_chans: int = 3
    image_size: int = 224
    dicom_window: tuple[float, float] | None = (-400.0, 1500.0)
    skip_unreadable: bool = False
    in_memory: bool = False
    positive_class: str | None = None


@dataclass
class TwoDSplitConfig:
    """Stratified, seeded split of the images (the folds themselves: ``fold``, ``train.n_folds``, ``train.fold_seed``).

    Attributes:
        mode: ``holdout`` (train / val / test fractions) or ``kfold`` (StratifiedKFold; ``fold`` is validation).
        val_fraction: ``holdout``: share of all images used for validation.
        test_fraction: share of all images held out as a test split before anything else (both modes; 0 = none).
    """

    mode: str = "holdout"
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass
class TwoDModelConfig:
    """The timm classifier.

    Attributes:
        backbone: any timm model name (``resnet18``, ``convnext_tiny``, ``mobilenetv3_large_100``, ...).
        pretrained_file: local timm weights file; None = random init (nothing is ever downloaded).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth (where the backbone supports it).
        global_pool: spatial pooling (timm name).
    """

    backbone: str = "resnet18"
    pretrained_file: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "avg"


@dataclass
class TwoDTrainConfig(TrainConfig):
    """The shared loop settings (:class:`~rsna_cspine.training.config.TrainConfig`) plus the 2D mode's own.

    Attributes:
        label_smoothing: cross-entropy label smoothing.
        class_weighted: weigh the loss by inverse class frequency of the training split.
        monitor: validation metric that picks ``best.pt`` and drives early stopping (one of
            :data:`MONITORS`); losses are minimised, the rest maximised.
        bn_recalibration_images: before each validation, re-estimate BatchNorm running statistics on up to
            this many un-augmented training images (0 = off). With small batches and geometric augmentation the
            running averages drift away from what clean images produce, and eval-mode predictions collapse
            onto one class although the weights have learnt the task.
    """

    epochs: int = 20
    batch_size: int = 32
    val_batch_size: int = 64
    label_smoothing: float = 0.0
    class_weighted: bool = False
    monitor: str = "val_loss"
    bn_recalibration_images: int = 2048


@dataclass
class TwoDConfig(RunConfig):
    """Everything one 2D training run uses; saved as ``config.yaml`` in the run folder.

    ``kfold`` trains fold ``K`` in ``run_dir/fold{K}``, ``holdout`` in ``run_dir`` (``fold`` unused).
    """

    #: Keys of configs written before the common schema (old → new); checkpoints carrying them still load.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        **FLAT_TRAIN_KEYS,
        "label_smoothing": "train.label_smoothing",
        "class_weighted": "train.class_weighted",
        "monitor": "train.monitor",
        "bn_recalibration_images": "train.bn_recalibration_images",
        "positive_class": "data.positive_class",
        "split.n_folds": "train.n_folds",
        "split.fold": "fold",
        "split.seed": "train.fold_seed",
    }
    #: Stage 2's copy-paste keys the 2D mode's ``aug`` section used to carry (always off there).
    RETIRED_KEYS: ClassVar[dict[str, Any]] = {"aug.paste_prob": 0.0, "aug.paste_feather": ANY_VALUE}

    run_dir: str = "runs/twod"
    data: TwoDDataConfig = field(default_factory=TwoDDataConfig)
    split: TwoDSplitConfig = field(default_factory=TwoDSplitConfig)
    model: TwoDModelConfig = field(default_factory=TwoDModelConfig)
    aug: ImageAugConfig = field(default_factory=lambda: ImageAugConfig(vflip=0.0, rotate_deg=10.0))
    train: TwoDTrainConfig = field(default_factory=TwoDTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def monitor_mode(self) -> str:
        """``min`` for a loss, ``max`` for every other metric."""
        return "min" if "loss" in self.train.monitor else "max"

    def fold_dir(self) -> Path:
        """``run_dir/fold{K}`` in k-fold mode, ``run_dir`` for a holdout split."""
        return fold_run_dir(self.run_dir, self.fold if self.split.mode == "kfold" else None)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot train."""
        s = self.split
        self.train.validate()
        self.aug.validate()
        if s.mode not in SPLIT_MODES:
            raise ConfigError(f"split.mode must be one of {SPLIT_MODES}, got {s.mode!r}")
        if not 0.0 <= s.test_fraction < 1.0 or not 0.0 < s.val_fraction < 1.0:
            raise ConfigError(f"split fractions must be in [0, 1): val {s.val_fraction}, test {s.test_fraction}")
        if s.mode == "holdout" and s.val_fraction + s.test_fraction >= 1.0:
            raise ConfigError("split.val_fraction + split.test_fraction must leave images to train on")
        if s.mode == "kfold" and not 0 <= self.fold < self.train.n_folds:
            raise ConfigError(f"fold must be in [0, {self.train.n_folds}) in kfold mode; got {self.fold}")
        self.check_run(self.train.n_folds)
        if self.data.in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans must be 1 or 3, got {self.data.in_chans}")
        if self.data.image_size < 8:
            raise ConfigError(f"data.image_size must be ≥ 8, got {self.data.image_size}")
        window = self.data.dicom_window
        if window is not None and window[1] <= window[0]:
            raise ConfigError(f"data.dicom_window must be (low, high) with high > low, got {window}")
        if self.train.bn_recalibration_images < 0:
            raise ConfigError(f"train.bn_recalibration_images must be ≥ 0, got {self.train.bn_recalibration_images}")
        if self.train.monitor not in MONITORS:
            raise ConfigError(f"train.monitor must be one of {MONITORS}, got {self.train.monitor!r}")

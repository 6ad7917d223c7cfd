"""Typed config of the 2D image-folder classifier (defaults ← YAML ← ``key=value`` overrides).

Augmentation and optimiser sections are stage 2's own dataclasses, so both modes read the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rsna_cspine.cls.config import ClsAugConfig, ClsOptimConfig
from rsna_cspine.errors import ConfigError

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
        num_workers: DataLoader workers.
        in_memory: keep the decoded, resized images in RAM (they are decoded once anyway to check them);
            ``in_chans × image_size² × 4`` bytes each, so for small sets or small sizes.
    """

    root: str = "data/images"
    in_chans: int = 3
    image_size: int = 224
    dicom_window: tuple[float, float] | None = (-400.0, 1500.0)
    skip_unreadable: bool = False
    num_workers: int = 2
    in_memory: bool = False


@dataclass
class TwoDSplitConfig:
    """Stratified, seeded split of the images.

    Attributes:
        mode: ``holdout`` (train / val / test fractions) or ``kfold`` (StratifiedKFold; ``fold`` is validation).
        val_fraction: ``holdout``: share of all images used for validation.
        test_fraction: share of all images held out as a test split before anything else (both modes; 0 = none).
        n_folds: ``kfold``: number of folds of the non-test images.
        fold: ``kfold``: the validation fold.
        seed: shuffles the images before splitting (keep it fixed across folds).
    """

    mode: str = "holdout"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    n_folds: int = 5
    fold: int = 0
    seed: int = 42


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
class TwoDConfig:
    """Everything one 2D training run uses; saved as ``config.yaml`` in the run folder.

    Attributes:
        run_dir: experiment folder (``kfold`` trains fold K in ``run_dir/fold{K}``, ``holdout`` in ``run_dir``).
        seed: run seed (weights, data order, augmentation).
        epochs: planned epochs (the schedule's length).
        batch_size: images per step.
        val_batch_size: images per evaluation step.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
        amp: mixed precision on GPU.
        grad_clip: max gradient norm (0 = off).
        label_smoothing: cross-entropy label smoothing.
        class_weighted: weigh the loss by inverse class frequency of the training split.
        monitor: validation metric that picks ``best.pt`` and drives early stopping (one of
            :data:`MONITORS`); losses are minimised, the rest maximised.
        bn_recalibration_images: before each validation, re-estimate BatchNorm running statistics on up to
            this many un-augmented training images (0 = off). With small batches and geometric augmentation the
            running averages drift away from what clean images produce, and eval-mode predictions collapse
            onto one class although the weights have learnt the task.
        early_stopping_patience: epochs without a better ``monitor`` before stopping (0 = never).
        max_minutes: stop before an epoch that would overrun this budget, with the learning-rate
            schedule fitted to the epochs that fit (0 = no budget; see ``engine.TimeBudget``).
        threads: CPU threads for torch (0 = torch's default).
        ema_decay: validate and save an exponential moving average of the weights (0 = off; see
            ``ClsConfig.ema_decay``).
        positive_class: the class binary metrics (precision, recall, specificity, F1, AUC) are about;
            None → the class that is not named like a negative (``normal``, ``negative``, ...), else the
            last one in sorted order.
        data: data settings.
        split: split settings.
        model: model settings.
        aug: augmentation (random resized crop, flips, rotation, intensity), as in stage 2.
        optim: optimiser and schedule, as in stage 2.
    """

    run_dir: str = "runs/twod"
    seed: int = 42
    epochs: int = 20
    batch_size: int = 32
    val_batch_size: int = 64
    device: str = "auto"
    amp: bool = True
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    class_weighted: bool = False
    monitor: str = "val_loss"
    bn_recalibration_images: int = 2048
    early_stopping_patience: int = 5
    max_minutes: float = 0.0
    threads: int = 0
    ema_decay: float = 0.0
    positive_class: str | None = None
    data: TwoDDataConfig = field(default_factory=TwoDDataConfig)
    split: TwoDSplitConfig = field(default_factory=TwoDSplitConfig)
    model: TwoDModelConfig = field(default_factory=TwoDModelConfig)
    aug: ClsAugConfig = field(default_factory=lambda: ClsAugConfig(vflip=0.0, rotate_deg=10.0))
    optim: ClsOptimConfig = field(default_factory=ClsOptimConfig)

    @property
    def monitor_mode(self) -> str:
        """``min`` for a loss, ``max`` for every other metric."""
        return "min" if "loss" in self.monitor else "max"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot train."""
        s = self.split
        if s.mode not in SPLIT_MODES:
            raise ConfigError(f"split.mode must be one of {SPLIT_MODES}, got {s.mode!r}")
        if not 0.0 <= s.test_fraction < 1.0 or not 0.0 < s.val_fraction < 1.0:
            raise ConfigError(f"split fractions must be in [0, 1): val {s.val_fraction}, test {s.test_fraction}")
        if s.mode == "holdout" and s.val_fraction + s.test_fraction >= 1.0:
            raise ConfigError("split.val_fraction + split.test_fraction must leave images to train on")
        if s.mode == "kfold" and (s.n_folds < 2 or not 0 <= s.fold < s.n_folds):
            raise ConfigError(f"split.fold must be in [0, {s.n_folds}) with n_folds ≥ 2; got {s.fold}/{s.n_folds}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.data.in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans must be 1 or 3, got {self.data.in_chans}")
        if self.data.image_size < 8:
            raise ConfigError(f"data.image_size must be ≥ 8, got {self.data.image_size}")
        window = self.data.dicom_window
        if window is not None and window[1] <= window[0]:
            raise ConfigError(f"data.dicom_window must be (low, high) with high > low, got {window}")
        if self.epochs < 1 or self.batch_size < 1 or self.val_batch_size < 1:
            raise ConfigError("epochs, batch_size and val_batch_size must be ≥ 1")
        if not 0.0 < self.aug.scale_min <= 1.0:
            raise ConfigError(f"aug.scale_min must be in (0, 1], got {self.aug.scale_min}")
        if self.aug.paste_prob > 0:
            raise ConfigError("aug.paste_prob (fracture copy-paste) needs per-slice box maps of vertebra stacks; "
                              "the 2D mode has none: set it to 0")
        if self.bn_recalibration_images < 0:
            raise ConfigError(f"bn_recalibration_images must be ≥ 0, got {self.bn_recalibration_images}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")

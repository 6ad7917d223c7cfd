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
#: How a study's image probabilities become the study's (``data.study_agg``).
STUDY_RULES: tuple[str, ...] = ("mean", "max")
#: What ``data.mask_with`` does with the predicted column mask (``data.mask_mode``).
MASK_MODES: tuple[str, ...] = ("overlay", "crop")
#: Classifier heads (``model.head``): the backbone's own linear layer, or two new fully connected layers.
HEADS: tuple[str, ...] = ("linear", "fc2")
#: Validation metrics of one view of the predictions.
METRICS: tuple[str, ...] = ("loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
#: Views: per image, per image as fracture present / absent (``data.negative_class``), per study, per study binary.
VIEWS: tuple[str, ...] = ("", "binary_", "study_", "study_binary_")
#: Validation metrics a run can monitor (``summary.csv`` columns); losses are minimised, the rest maximised.
MONITORS: tuple[str, ...] = tuple(f"val_{view}{metric}" for view in VIEWS for metric in METRICS)


@dataclass
class TwoDDataConfig:
    """Where the images come from and how they become tensors.

    Attributes:
        root: a folder with one sub-folder per class (images directly in it, or in one sub-folder per
            study), or a CSV file of ``path,label`` (paths relative to the CSV's folder; optional ``study``
            and ``slice`` columns).
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
        label_column: the CSV column that holds the class (e.g. ``label`` for a grade, ``fracture`` for
            fracture / normal in ``synth-sagittal``'s table).
        class_order: the classes in output order (required for ``model.ordinal``: least to most severe);
            None = sorted names.
        negative_class: in a problem of more than two classes, the class meaning "no finding": the reports and
            ``val_binary_*`` metrics then also judge fracture present (any other class) vs absent. None = the
            one class named like a negative (``normal``, ``absent``, ...) if there is exactly one.
        study_agg: how a study's probabilities follow from its images': ``mean`` of their class
            probabilities, or ``max``: those of its most suspicious image (highest probability of the positive
            class; with a negative class, lowest probability of it; otherwise the most confident image).
        middle_k: use only the middle ``k`` images of each study (ordered by the ``slice`` column, else by
            path); 0 = all.
        mask_with: a ``train-2d-seg`` checkpoint whose column mask is applied to every image before
            classification (training and prediction); its weights are stored in the classifier's checkpoint.
        mask_mode: ``overlay``: pixels outside the (widened) column set to 0; ``crop``: the image cut to the
            column's bounding box (plus the margin) and resized back.
        mask_margin: widening of the mask, and the crop's margin, as a share of the image side.
    """

    root: str = "data/images"
    in_chans: int = 3
    image_size: int = 224
    dicom_window: tuple[float, float] | None = (-400.0, 1500.0)
    skip_unreadable: bool = False
    in_memory: bool = False
    positive_class: str | None = None
    label_column: str = "label"
    class_order: tuple[str, ...] | None = None
    negative_class: str | None = None
    study_agg: str = "mean"
    middle_k: int = 0
    mask_with: str | None = None
    mask_mode: str = "overlay"
    mask_margin: float = 0.03


@dataclass
class TwoDSplitConfig:
    """Stratified, seeded split of the images (the folds themselves: ``fold``, ``train.n_folds``, ``train.fold_seed``).

    Images of one study (``study`` column or sub-folder) always land in the same split.

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
    """The classifier.

    Attributes:
        backbone: any timm model name (``resnet18``, ``convnext_tiny``, ``mobilenetv3_large_100``, ...) or a
            torchvision one: ``tv/alexnet``, ``tv/googlenet`` (3 input channels; ImageNet statistics).
        pretrained_file: local weights file (timm's, or a torchvision state dict); None = random init
            (nothing is ever downloaded).
        drop_rate: dropout before the classifier (``fc2``: before each of its two layers).
        drop_path_rate: stochastic depth (where the backbone supports it).
        global_pool: spatial pooling (timm name; timm backbones only).
        head: ``linear`` (the backbone's own classifier layer, resized) or ``fc2`` (two new fully connected
            layers with ReLU and dropout, as in transfer learning on AlexNet / GoogLeNet features).
        head_hidden: width of ``fc2``'s first layer.
        ordinal: one shared score with ordered thresholds (CORAL) instead of one logit per class, trained
            with binary cross-entropy on "grade > k"; needs ``data.class_order`` from least to most severe.
    """

    backbone: str = "resnet18"
    pretrained_file: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "avg"
    head: str = "linear"
    head_hidden: int = 256
    ordinal: bool = False


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
        d, m = self.data, self.model
        if d.study_agg not in STUDY_RULES:
            raise ConfigError(f"data.study_agg must be one of {STUDY_RULES}, got {d.study_agg!r}")
        if d.middle_k < 0:
            raise ConfigError(f"data.middle_k must be ≥ 0 (0 = every image of a study), got {d.middle_k}")
        if d.mask_mode not in MASK_MODES:
            raise ConfigError(f"data.mask_mode must be one of {MASK_MODES}, got {d.mask_mode!r}")
        if not 0.0 <= d.mask_margin < 0.5:
            raise ConfigError(f"data.mask_margin must be in [0, 0.5), got {d.mask_margin}")
        if d.class_order is not None and len(set(d.class_order)) != len(d.class_order):
            raise ConfigError(f"data.class_order names a class twice: {d.class_order}")
        if m.head not in HEADS:
            raise ConfigError(f"model.head must be one of {HEADS}, got {m.head!r}")
        if m.head_hidden < 1 or not 0.0 <= m.drop_rate < 1.0:
            raise ConfigError("model.head_hidden must be ≥ 1 and model.drop_rate in [0, 1)")
        if m.ordinal and d.class_order is None:
            raise ConfigError("model.ordinal needs data.class_order (the classes from least to most severe)")

"""Typed config of the stage-2 fracture classifier (defaults ← YAML ← ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.errors import ConfigError

HEADS: tuple[str, ...] = ("gru", "lstm", "attention")


@dataclass
class ClsDataConfig:
    """Where the studies and their crops come from.

    Attributes:
        root: Kaggle-layout folder (train.csv, train_images/, segmentations/, train_bounding_boxes.csv).
        cache_dir: crop cache folder (``<uid>.npz`` per study); built on first use.
        mask_source: ``gt``, ``pred`` or ``gt_then_pred`` (see ``crops.cache.build_crop_cache``).
        pred_mask_dir: stage-1 masks (``<uid>_mask.npz``) for ``pred``/``gt_then_pred``.
        cache_workers: processes used to build missing crops.
        num_workers: DataLoader workers.
        in_memory: keep every decoded stack in RAM (small datasets; saves re-reading the npz each epoch).
        crop: crop geometry; ``model.in_chans`` follows from it.
    """

    root: str = "data/kaggle"
    cache_dir: str = "work/crops"
    mask_source: str = "gt_then_pred"
    pred_mask_dir: str | None = None
    cache_workers: int = 0
    num_workers: int = 2
    in_memory: bool = False
    crop: CropConfig = field(default_factory=CropConfig)


@dataclass
class ClsModelConfig:
    """Backbone and sequence head.

    Attributes:
        backbone: any timm model name (features taken before its classifier).
        head: ``gru``, ``lstm`` (bidirectional) or ``attention`` (attention pooling) over the slices.
        hidden: hidden size of the head.
        dropout: dropout before the output layers.
        drop_path_rate: stochastic depth inside the backbone (where the backbone supports it).
        slice_logits: also predict one logit per slice (supervised by bounding boxes where known).
        pretrained_file: local timm weights file; None = random init (nothing is ever downloaded).
        grad_checkpointing: trade compute for memory in the backbone (large crops on GPU).
        global_pool: the backbone's spatial pooling (timm): ``avg``, ``max`` (suits small focal defects) or ``avgmax``.
        vertebra_bias: a learned logit offset per vertebra (C1..C7), so the model can carry each
            vertebra's own base rate (C7 fractures ~5× as often as C3). Off by default only so that
            checkpoints written before it existed still load; the shipped configs switch it on.
        box_logits: also predict, on the backbone's last feature map, which cells of each slice hold
            the fracture (supervised by the bounding boxes drawn into the crop, ``box_loss_weight``):
            the boxes then teach where to look, not only which slices.
    """

    backbone: str = "resnet50"
    head: str = "gru"
    hidden: int = 256
    dropout: float = 0.2
    drop_path_rate: float = 0.0
    slice_logits: bool = True
    pretrained_file: str | None = None
    grad_checkpointing: bool = False
    global_pool: str = "avg"
    vertebra_bias: bool = False
    box_logits: bool = False


@dataclass
class ClsAugConfig:
    """Augmentations applied identically to every plane of a vertebra's stack.

    Attributes:
        enabled: switch all augmentation off (validation never augments).
        scale_min: smallest area share kept by the random resized crop.
        hflip: probability of a left-right flip.
        vflip: probability of an anterior-posterior flip.
        rotate_deg: largest in-plane rotation, either way.
        translate: largest shift as a fraction of the size.
        brightness: largest additive intensity shift (images are 0..1).
        contrast: largest relative contrast change.
        paste_prob: probability that a fracture-free training stack gets a fracture pasted in (copy-paste
            augmentation, 0 = off): the box regions of a fractured stack of the same vertebra from the same
            split (its per-slice box maps, see ``crops.box_maps_from_boxes``), blended in with a soft edge on
            the same centre slices, with that stack's slice labels; the item then counts as fractured.
            Raises the fractured share the model sees by about ``paste_prob`` × the negative share.
        paste_feather: width in pixels of the soft edge around a pasted box (Gaussian sigma).
    """

    enabled: bool = True
    scale_min: float = 0.75
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 15.0
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.15
    paste_prob: float = 0.0
    paste_feather: float = 1.5


@dataclass
class ClsOptimConfig:
    """Optimiser (timm ``create_optimizer_v2``) and schedule (timm ``create_scheduler_v2``).

    Attributes:
        opt: ``adamw``, ``sgd``, ``adam``, ... (any timm optimiser name).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (biases and norms excluded).
        momentum: SGD momentum.
        sched: ``cosine`` or ``step`` (or any timm scheduler name).
        warmup_epochs: linear warm-up length.
        warmup_lr: learning rate at the start of warm-up.
        min_lr: floor of the cosine.
        decay_epochs: step schedule: epochs between decays.
        decay_rate: step schedule: multiplier at each decay.
    """

    opt: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    decay_epochs: float = 5.0
    decay_rate: float = 0.3


@dataclass
class ClsConfig:
    """Everything one stage-2 training run uses; saved as ``config.yaml`` in the run folder.

    Attributes:
        run_dir: experiment folder; fold ``K`` trains in ``run_dir/fold{K}`` and writes ``run_dir/oof_fold{K}.csv``.
        fold: validation fold (``-1``: train on every study, no validation, no OOF file).
        n_folds: GroupKFold folds by study.
        fold_seed: shuffles studies before the fold split (keep it fixed across folds).
        seed: run seed (weights, data order, augmentation).
        epochs: planned epochs (the schedule's length).
        batch_size: vertebrae per step.
        val_batch_size: vertebrae per validation step.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
        amp: mixed precision on GPU.
        grad_clip: max gradient norm (0 = off).
        slice_loss_weight: weight of the per-slice BCE on known slice labels (0 = off).
        box_loss_weight: weight of the per-cell BCE of ``model.box_logits`` against the box maps, on
            slices with known labels (0 = off).
        early_stopping_patience: epochs without a better validation score before stopping (0 = never).
        max_minutes: stop before an epoch that would overrun this budget, with the learning-rate
            schedule fitted to the epochs that fit (0 = no budget; see ``engine.TimeBudget``).
        threads: CPU threads for torch (0 = torch's default).
        ema_decay: keep an exponential moving average of the weights (timm ``ModelEmaV3``, decay
            warming up to this value) and validate/save it instead of the raw weights (0 = off).
            Small, noisy validation sets pick a lucky epoch less often from a smoothed model.
        vertebra_sampling_weights: seven relative draw weights, C1..C7, for the training items of each
            vertebra (empty = every item once per epoch). Items are then drawn with replacement, an
            epoch as long as the item list. Positives and negatives of a vertebra are drawn alike, so
            its base rate (and the calibration of its probabilities) is unchanged; only how often the
            model sees that vertebra's anatomy changes (C1, a ring with no body, is 1 in 7 items).
        data: data settings.
        model: model settings.
        aug: augmentation settings.
        optim: optimiser and schedule settings.
    """

    run_dir: str = "runs/cls"
    fold: int = 0
    n_folds: int = 5
    fold_seed: int = 42
    seed: int = 42
    epochs: int = 15
    batch_size: int = 8
    val_batch_size: int = 16
    device: str = "auto"
    amp: bool = True
    grad_clip: float = 5.0
    slice_loss_weight: float = 0.2
    box_loss_weight: float = 0.0
    early_stopping_patience: int = 5
    max_minutes: float = 0.0
    threads: int = 0
    ema_decay: float = 0.0
    vertebra_sampling_weights: tuple[float, ...] = ()
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    aug: ClsAugConfig = field(default_factory=ClsAugConfig)
    optim: ClsOptimConfig = field(default_factory=ClsOptimConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot train."""
        self.data.crop.validate()
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head must be one of {HEADS}, got {self.model.head!r}")
        if self.n_folds < 2 or not (-1 <= self.fold < self.n_folds):
            raise ConfigError(f"fold must be -1 or in [0, {self.n_folds}), with n_folds ≥ 2; got {self.fold}/{self.n_folds}")
        if self.epochs < 1 or self.batch_size < 1 or self.val_batch_size < 1:
            raise ConfigError("epochs, batch_size and val_batch_size must be ≥ 1")
        if self.box_loss_weight < 0 or (self.box_loss_weight > 0) != self.model.box_logits:
            # An output without its loss would be an unused parameter (DDP refuses those) and vice versa.
            raise ConfigError("model.box_logits=true and box_loss_weight > 0 go together; got "
                              f"box_logits={self.model.box_logits}, box_loss_weight={self.box_loss_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        weights = self.vertebra_sampling_weights
        if weights and (len(weights) != 7 or min(weights) < 0 or sum(weights) <= 0):
            raise ConfigError(f"vertebra_sampling_weights must be 7 non-negative values (C1..C7), not all zero; got {weights}")
        if not 0.0 < self.aug.scale_min <= 1.0:
            raise ConfigError(f"aug.scale_min must be in (0, 1], got {self.aug.scale_min}")
        if not 0.0 <= self.aug.paste_prob <= 1.0 or self.aug.paste_feather < 0:
            raise ConfigError("aug.paste_prob must be in [0, 1] and aug.paste_feather ≥ 0; got "
                              f"{self.aug.paste_prob}, {self.aug.paste_feather}")

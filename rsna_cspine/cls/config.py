"""Typed config of the stage-2 fracture classifier (defaults ← YAML ← ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rsna_cspine.config import ANY_VALUE
from rsna_cspine.constants import KNOWN_BROKEN_STUDIES
from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.errors import ConfigError
from rsna_cspine.training.config import FLAT_TRAIN_KEYS, ImageAugConfig, OptimConfig, RunConfig, TrainConfig

HEADS: tuple[str, ...] = ("gru", "lstm", "attention")
#: Validation scores (``summary.csv`` columns, lower is better) that can pick ``best.pt``.
MONITORS: tuple[str, ...] = ("val_score", "val_score_noisy_or")


@dataclass
class ClsDataConfig:
    """Where the studies and their crops come from.

    Attributes:
        root: Kaggle-layout folder (train.csv; the images are read by ``prepare`` only).
        cache_dir: the prepared cache (``rsna-cspine prepare``) whose ``crops/<uid>.npz`` hold each study's
            stacks; it must have been prepared with this ``crop`` (which mask they were cut from is a
            setting of ``prepare``, recorded in its manifest).
        val_cache_dir: a second prepared cache the validation studies' crops come from instead (empty: from
            ``cache_dir``). Prepared with ``--seg-models``, it holds crops cut with stage 1's masks, as the
            test crops are: the best epoch and the stored calibration are then chosen on what ``predict``
            will see, not on crops cut with the true masks. It needs only the fold's validation studies.
        in_memory: keep every decoded stack in RAM (small datasets; saves re-reading the npz each epoch).
        exclude: StudyInstanceUIDs never used for training (default: the real data set's known broken
            scans, see README).
        crop: crop geometry; ``model.in_chans`` follows from it.
    """

    root: str = "data/kaggle"
    cache_dir: str = "work/prepared"
    val_cache_dir: str = ""
    in_memory: bool = False
    exclude: tuple[str, ...] = KNOWN_BROKEN_STUDIES
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


@dataclass
class ClsAugConfig(ImageAugConfig):
    """The shared stack augmentation (:class:`~rsna_cspine.training.config.ImageAugConfig`) plus fracture copy-paste.

    Attributes:
        paste_prob: probability that a fracture-free training stack gets a fracture pasted in (copy-paste
            augmentation, 0 = off): the box regions of a fractured stack of the same vertebra from the same
            split (its per-slice box maps, see ``crops.box_maps_from_boxes``), blended in with a soft edge on
            the same centre slices, with that stack's slice labels; the item then counts as fractured.
            Raises the fractured share the model sees by about ``paste_prob`` × the negative share.
        paste_feather: width in pixels of the soft edge around a pasted box (Gaussian sigma).
    """

    paste_prob: float = 0.0
    paste_feather: float = 1.5

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.paste_prob <= 1.0 or self.paste_feather < 0:
            raise ConfigError("aug.paste_prob must be in [0, 1] and aug.paste_feather ≥ 0; got "
                              f"{self.paste_prob}, {self.paste_feather}")


@dataclass
class ClsTrainConfig(TrainConfig):
    """The shared loop settings (:class:`~rsna_cspine.training.config.TrainConfig`) plus stage 2's loss weight
    and the score that picks ``best.pt``.

    Attributes:
        slice_loss_weight: weight of the per-slice BCE on known slice labels (0 = off).
        monitor: the validation score that picks ``best.pt`` and drives early stopping: ``val_score``
            (patient_overall by the ``calibrated`` rule, ``predict``'s default) or ``val_score_noisy_or`` (for
            ``--rule noisy_or``). Pick the epoch on the rule the models will predict with.
    """

    slice_loss_weight: float = 0.2
    monitor: str = "val_score"


@dataclass
class ClsConfig(RunConfig):
    """Everything one stage-2 training run uses; saved as ``config.yaml`` in the fold's folder.

    Fold ``K`` trains in ``run_dir/fold{K}`` and writes ``run_dir/oof_fold{K}.csv`` (fold ``-1``: every
    study, no validation, no OOF file). The predictor rebuilds the model and the crop geometry from the
    ``data.crop`` and ``model`` sections stored in each checkpoint.
    """

    #: Keys of configs written before the common schema (old → new); checkpoints carrying them still load.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        **FLAT_TRAIN_KEYS,
        "n_folds": "train.n_folds",
        "fold_seed": "train.fold_seed",
        "slice_loss_weight": "train.slice_loss_weight",
    }
    #: Settings that were removed (benchmarks/results/evidence.md) and the values under which old
    #: checkpoints still load as trained.
    RETIRED_KEYS: ClassVar[dict[str, Any]] = {
        "box_loss_weight": ANY_VALUE,
        "vertebra_sampling_weights": ANY_VALUE,
        "model.box_logits": False,
        "data.crop.isolate": False,
    }
    #: Settings that moved out of the training config (they decide how the cache is prepared): where to.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "data.mask_source": "rsna-cspine prepare (mask_source, --seg-models)",
        "data.pred_mask_dir": "rsna-cspine prepare --seg-models",
        "data.cache_workers": "rsna-cspine prepare --workers/--cpus",
    }

    run_dir: str = "runs/cls"
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    aug: ClsAugConfig = field(default_factory=ClsAugConfig)
    train: ClsTrainConfig = field(default_factory=ClsTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot train."""
        self.data.crop.validate()
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head must be one of {HEADS}, got {self.model.head!r}")
        self.train.validate()
        if self.train.monitor not in MONITORS:
            raise ConfigError(f"train.monitor must be one of {MONITORS}, got {self.train.monitor!r}")
        self.check_run(self.train.n_folds)
        self.aug.validate()
        if self.train.slice_loss_weight < 0:
            raise ConfigError(f"train.slice_loss_weight must be ≥ 0, got {self.train.slice_loss_weight}")

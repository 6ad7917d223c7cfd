"""The config sections every stage shares: the run's identity, ``train:`` (loop settings), ``optim:``
(timm optimiser and schedule) and the image augmentation of the 2D-slice stages.

Every stage's config has the same shape: ``run_dir, fold, seed, device`` at the top, then ``data:``,
``model:``, ``aug:``, ``train:`` and ``optim:`` (plus stage-specific sections: stage 1's ``predict:``, the
2D mode's ``split:``). A stage that needs more training settings subclasses :class:`TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsna_cspine.engine.folds import fold_run_dir
from rsna_cspine.errors import ConfigError

#: Training keys that stage 2 and the 2D mode kept at the top of their configs before the common schema
#: (old → new); each of those stages' ``LEGACY_KEYS`` starts from these and adds its own.
FLAT_TRAIN_KEYS: dict[str, str] = {
    **{key: f"train.{key}" for key in ("epochs", "batch_size", "val_batch_size", "amp", "grad_clip", "max_minutes",
                                        "threads", "ema_decay")},
    "early_stopping_patience": "train.patience",
    "data.num_workers": "train.num_workers",
}


@dataclass
class TrainConfig:
    """The training loop's settings (``rsna_cspine.training.loop.fit``).

    Attributes:
        epochs: planned epochs (the learning-rate schedule's length).
        batch_size: items per training step and process.
        val_batch_size: items per validation step.
        amp: mixed precision: on GPU (``engine.amp_dtype`` picks bfloat16 or float16), and bfloat16 on CPUs
            that compute it natively (``engine.training_autocast``); full precision on other CPUs.
        grad_clip: max gradient norm (0 = off).
        patience: validations without a better monitored score before stopping (0 = never).
        val_every: validate every this many epochs (and always after the last one).
        val_from: validate only from this fraction of the run on (of the planned epochs: the configured
            count, or with a time budget the count that fits it; 0 = from the first epoch). Under a cosine
            schedule fitted to a budget the best epoch comes late, and each validation costs training time.
        max_minutes: wall-clock budget counted from the start of the command (data preparation
            included, and the time of earlier runs when resuming); the run stops before an epoch that would
            overrun it, and the schedule is fitted to the epochs that fit (0 = none; ``engine.TimeBudget``).
        threads: torch intra-op threads (0 = torch's default). On a CPU shared with other jobs one thread
            can be faster than two.
        num_workers: DataLoader worker processes (0 = in the training process).
        ema_decay: validate and save an exponential moving average of the weights (timm ``ModelEmaV3``,
            decay warming up to this value; 0 = off). ``last.pt`` keeps the raw weights for ``--resume``.
        n_folds: GroupKFold folds by study.
        fold_seed: shuffles studies before the fold split (keep it fixed across the folds of a run).
    """

    epochs: int = 15
    batch_size: int = 8
    val_batch_size: int = 16
    amp: bool = True
    grad_clip: float = 5.0
    patience: int = 5
    val_every: int = 1
    val_from: float = 0.0
    max_minutes: float = 0.0
    threads: int = 0
    num_workers: int = 2
    ema_decay: float = 0.0
    n_folds: int = 5
    fold_seed: int = 42

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values the loop cannot run with."""
        if self.epochs < 1 or self.batch_size < 1 or self.val_batch_size < 1 or self.val_every < 1:
            raise ConfigError("train.epochs, train.batch_size, train.val_batch_size and train.val_every must be ≥ 1")
        if min(self.grad_clip, self.patience, self.max_minutes, self.threads, self.num_workers) < 0:
            raise ConfigError("train.grad_clip, patience, max_minutes, threads and num_workers must be ≥ 0")
        if not 0.0 <= self.val_from < 1.0:
            raise ConfigError(f"train.val_from must be in [0, 1), got {self.val_from}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.n_folds < 2:
            raise ConfigError(f"train.n_folds must be ≥ 2, got {self.n_folds}")


@dataclass
class OptimConfig:
    """Optimiser (timm ``create_optimizer_v2``) and schedule (timm ``create_scheduler_v2``, stepped per update).

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
class ImageAugConfig:
    """Augmentation of 2D images and slice stacks (``training.augment.StackAugment``): one random affine
    map for every plane, and an intensity change of the image planes.

    Attributes:
        enabled: switch all augmentation off (validation never augments).
        scale_min: smallest area share kept by the random resized crop.
        hflip: probability of a left-right flip.
        vflip: probability of an anterior-posterior flip.
        rotate_deg: largest in-plane rotation, either way.
        translate: largest shift as a fraction of the size.
        brightness: largest additive intensity shift (images are 0..1).
        contrast: largest relative contrast change.
        noise_std: largest standard deviation of Gaussian noise added to the image planes (each stack draws
            its own from 0..``noise_std``; images are 0..1). 0: off.
        low_res_zoom: smallest zoom of the low-resolution simulation (each stack is shrunk by a factor drawn
            from ``low_res_zoom``..1 and enlarged back): the blur of a structure cut from fewer pixels, as in
            a smaller patient or a coarser scan. 1: off.
    """

    enabled: bool = True
    scale_min: float = 0.75
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 15.0
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.15
    noise_std: float = 0.0
    low_res_zoom: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"aug.scale_min must be in (0, 1], got {self.scale_min}")
        if not 0.0 < self.low_res_zoom <= 1.0 or self.noise_std < 0.0:
            raise ConfigError(f"aug.low_res_zoom must be in (0, 1] and aug.noise_std >= 0, got "
                              f"{self.low_res_zoom}, {self.noise_std}")


@dataclass
class RunConfig:
    """The head every stage's config starts with.

    Attributes:
        run_dir: experiment folder; fold ``K`` trains in ``run_dir/fold{K}`` (``run_dir/all`` for fold -1).
        fold: validation fold (``-1``: train on every study, no validation).
        seed: run seed (weights, data order, augmentation).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
    """

    run_dir: str = "runs/run"
    fold: int = 0
    seed: int = 42
    device: str = "auto"

    def fold_dir(self) -> Path:
        """Where this fold's checkpoints, ``config.yaml`` and ``summary.csv`` go (``engine.fold_run_dir``)."""
        return fold_run_dir(self.run_dir, self.fold)

    def check_run(self, n_folds: int) -> None:
        """Refuse a fold outside ``[-1, n_folds)`` and a ``run_dir`` that still holds a ``{fold}`` template."""
        if not -1 <= self.fold < n_folds:
            raise ConfigError(f"fold must be -1 or in [0, {n_folds}) for train.n_folds={n_folds}; got {self.fold}")
        if "{" in self.run_dir:
            raise ConfigError(f"run_dir {self.run_dir!r}: the fold folder is added for you (run_dir/fold{{K}}); "
                              "drop the {fold} template")

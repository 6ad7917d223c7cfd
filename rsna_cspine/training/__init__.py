"""The one training loop every stage uses (:func:`fit` over a :class:`TrainingTask`) and the config
sections every stage shares (``train:``, ``optim:``, image ``aug:``)."""

from rsna_cspine.training.config import ImageAugConfig, OptimConfig, RunConfig, TrainConfig
from rsna_cspine.training.loop import TrainingTask, fit, train_one_epoch

__all__ = ["ImageAugConfig", "OptimConfig", "RunConfig", "TrainConfig", "TrainingTask", "fit", "train_one_epoch"]

"""Settings of a prediction run (:class:`PipelineConfig`): patient rule, device, speed-ups, time budget, prior."""

from __future__ import annotations

from dataclasses import dataclass

from rsna_cspine.aggregate import PATIENT_RULES
from rsna_cspine.errors import ConfigError

#: Where the fallback prior comes from (see ``PipelineConfig.prior``).
PRIOR_SOURCES: tuple[str, ...] = ("train_csv", "models", "real")


@dataclass
class PipelineConfig:
    """How studies are predicted and aggregated; set by ``config.load_config`` (YAML, flags, ``key=value``).

    Attributes:
        rule: patient_overall rule over the seven (prior-filled) vertebra probabilities; one of
            ``aggregate.PATIENT_RULES``. ``calibrated`` (default): noisy-OR through the Platt fits that
            the stage-2 checkpoints carry from their validation folds, averaged; checkpoints without
            one fall back to plain ``noisy_or`` (logged). ``noisy_or``, ``max``, ``mean_top``, ``blend``:
            fixed rules.
        blend_weight: weight of noisy-OR in the ``blend`` rule (the rest is ``max``).
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        tta: average the classifier over a horizontal flip on the full path.
        cpu_bf16: run stage 2 under bfloat16 autocast on CPU (≈ 1.4× faster there); honoured only where
            the CPU has native bf16, fp32 elsewhere. Probabilities move by ~1e-3, so it is part of the
            resume fingerprint.
        time_budget_s: wall-clock limit of the whole run (model loading included); ``None`` = no limit,
            ``0`` = every study gets the prior. Studies switch to the cheap path, then the prior, when the
            median time per study says the rest would not fit.
        budget_safety: the time estimates are multiplied by this before comparing with the time left.
        cheap_folds: how many classifier checkpoints the cheap path uses (no TTA).
        prior: fallback probabilities (absent vertebrae, failed studies): ``train_csv`` = the prevalence of
            ``<data>/train.csv`` when it has labelled studies (on Kaggle that is the real prevalence), else
            as ``models``; ``models`` = the training prevalence the stage-2 checkpoints store (their mean;
            the real prevalence, with a warning, for checkpoints written before they stored it);
            ``real`` = always ``constants.REAL_PREVALENCE``. ``predict --inputs`` has no train.csv:
            ``train_csv`` acts as ``models`` there.
        resume: skip studies already predicted into ``<out>.parts/`` by an earlier run with the same
            models and settings.
        split: which image folder of the Kaggle layout holds the studies (``test`` or ``train``).
    """

    rule: str = "calibrated"
    blend_weight: float = 0.5
    device: str = "auto"
    tta: bool = False
    cpu_bf16: bool = False
    time_budget_s: float | None = None
    budget_safety: float = 1.2
    cheap_folds: int = 1
    prior: str = "train_csv"
    resume: bool = True
    split: str = "test"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a value that cannot work."""
        if self.rule not in PATIENT_RULES:
            raise ConfigError(f"rule must be one of {PATIENT_RULES}, got {self.rule!r}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ConfigError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ConfigError(f"time_budget_s must be ≥ 0 (or null for no limit), got {self.time_budget_s}")
        if self.budget_safety < 1.0:
            raise ConfigError(f"budget_safety must be ≥ 1, got {self.budget_safety}")
        if self.cheap_folds < 1:
            raise ConfigError(f"cheap_folds must be ≥ 1, got {self.cheap_folds}")
        if self.prior not in PRIOR_SOURCES:
            raise ConfigError(f"prior must be one of {PRIOR_SOURCES}, got {self.prior!r}")
        if self.split not in ("test", "train"):
            raise ConfigError(f"split must be 'test' or 'train', got {self.split!r}")


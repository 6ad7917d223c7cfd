"""What decides how long a run trains and how its weights are smoothed: early stopping, the wall-clock
budget that fits the learning-rate schedule to the epochs that fit, and the weight average."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` validations in a row (0 = never)."""

    patience: int = 5
    mode: str = "min"
    best: float | None = None
    bad_epochs: int = 0

    def step(self, value: float) -> bool:
        """Record one epoch's value; returns True when it is the best so far."""
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state.get("best"), state.get("bad_epochs", 0)


@dataclass
class TimeBudget:
    """A wall-clock training budget: when to stop, and how far along the learning-rate schedule to be.

    Without a budget the schedule runs over ``epochs`` as configured. With one, a run usually ends
    before ``epochs``; an epoch-based cosine would then stop half-way down, with the learning rate still
    high. So after every epoch the run re-plans how many epochs fit (epochs done + time left / mean
    epoch time so far) and the schedule is compressed onto that count: the learning rate reaches its
    floor when the budget ends. Every input is a number the DDP ranks already agree on (see
    ``all_reduce_mean``), so all ranks follow the same schedule.

    Attributes:
        epochs: the configured epoch count (the schedule's own length).
        budget_s: seconds available for training (≤ 0: no budget).
    """

    epochs: int
    budget_s: float
    planned: float = 0.0
    longest_epoch_s: float = 0.0

    def __post_init__(self) -> None:
        self.planned = float(self.epochs)

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def update(self, epochs_done: int, train_s: float, spent_s: float, last_epoch_s: float) -> None:
        """Re-plan after an epoch.

        Args:
            epochs_done: epochs finished by this process (at least 1).
            train_s: seconds those epochs took (the pace is ``train_s / epochs_done``).
            spent_s: seconds of the budget used so far (including preparation and earlier runs).
            last_epoch_s: the epoch just finished, for the stop rule.
        """
        self.longest_epoch_s = max(self.longest_epoch_s, last_epoch_s)
        if not self.enabled or epochs_done <= 0 or train_s <= 0:
            return
        left = max(self.budget_s - spent_s, 0.0)
        self.planned = min(float(self.epochs), epochs_done + left / (train_s / epochs_done))

    def next_epoch_fits(self, spent_s: float) -> bool:
        """Whether one more epoch (as long as the longest so far) ends inside the budget."""
        return not self.enabled or spent_s + self.longest_epoch_s <= self.budget_s

    def position(self, epoch: float) -> float:
        """Where ``epoch`` (fractional within an epoch) stands on the configured schedule, in its epochs."""
        if not self.enabled or self.planned <= 0:
            return epoch
        return min(epoch * self.epochs / self.planned, float(self.epochs))

    def state_dict(self) -> dict[str, float]:
        return {"planned": self.planned, "longest_epoch_s": self.longest_epoch_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.planned = float(state.get("planned", self.epochs))
        self.longest_epoch_s = float(state.get("longest_epoch_s", 0.0))


def make_model_ema(model: torch.nn.Module, decay: float) -> Any | None:
    """An exponential moving average of ``model``'s weights (timm ``ModelEmaV3``), or None when ``decay`` ≤ 0.

    The decay warms up (``1 - (1 + step) ** -0.75``, capped at ``decay``), so short CPU runs average
    over a window that grows with training instead of dragging the random initialisation along.

    Args:
        model: the bare (not DDP-wrapped) model; the average starts as a copy of its current weights.
        decay: the largest per-update decay (e.g. 0.998 ≈ the last 500 updates); ≤ 0 turns the average off.
    """
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)

"""Training machinery shared by every trainer (stage 1, stage 2, 2D mode).

Seeds, device/AMP choice, torch.distributed set-up, checkpoints that carry everything a resumed run
needs (weights, optimiser, scheduler, AMP scaler, epoch, best score, all RNG states), the per-epoch
``summary.csv`` with its curve plot, and early stopping. Kept in one place so the trainers differ only
in their data and model.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); optionally ask cuDNN for deterministic kernels.

    Args:
        seed: the run's seed.
        deterministic: trade some GPU speed for run-to-run identical results.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the local CUDA device when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """Mixed precision on GPU (fp16/bf16 as torch chooses); a no-op on CPU where AMP rarely pays off."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return nullcontext()


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (bf16 and CPU need none)."""
    use = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=use)


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun) support
# ----------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (world_size 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); nccl on GPU, gloo on CPU.

    Args:
        device: the device this process trains on; decides the backend.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when in a process group, the plain module otherwise.

    On GPU, BatchNorm layers become SyncBatchNorm so that running statistics are computed over the global
    batch and stay identical on every rank (per-rank batches are small for 3D and 2.5D inputs). PyTorch's
    SyncBatchNorm is GPU-only, so on CPU (gloo) the running statistics stay rank-local; rank 0's are saved.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Average a python scalar over ranks (identity without a process group)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / ctx.world_size)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is True on at least one; keeps per-rank decisions (a time budget
    measured by each rank's own clock) from splitting the group, which would hang the next collective."""
    if not ctx.enabled:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


_T = TypeVar("_T")


def run_seeded_distributed(
    body: Callable[[torch.device, DistContext], _T], *, device: str, seed: int, threads: int = 0
) -> _T:
    """Set threads and seeds, resolve the device, join the process group (under torchrun), run ``body``.

    Args:
        body: the training function, called with the device and the distributed context.
        device: "auto", "cpu", "cuda", ...
        seed: global seed.
        threads: torch intra-op threads (0 keeps torch's default).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    seed_everything(seed)
    resolved = resolve_device(device)
    ctx = init_distributed(resolved)
    try:
        return body(resolved, ctx)
    finally:
        cleanup_distributed(ctx)


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    best_score: float | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to resume or to predict, atomically (tmp file, then rename).

    Args:
        path: destination ``.pt`` file.
        model: the (possibly DDP-wrapped) model; the bare module's weights are stored.
        optimizer: optimiser whose state is stored for ``--resume``.
        scheduler: LR scheduler (torch or timm) with ``state_dict``.
        scaler: AMP GradScaler.
        epoch: number of completed epochs.
        best_score: best validation score so far (for early stopping after resume).
        config: the resolved run config, so a checkpoint alone can rebuild its model.
        extra: anything else (early-stopping counters, class names, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_score": best_score,
        "config": config,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        path: the ``.pt`` file.
        model: receives the weights (bare or DDP-wrapped).
        optimizer: receives its state when the checkpoint has one.
        scheduler: receives its state when the checkpoint has one.
        scaler: receives its state when the checkpoint has one.
        restore_rng: also restore python/numpy/torch RNG states (``--resume``).
        map_location: where tensors are loaded.

    Returns:
        The raw checkpoint dictionary (epoch, best_score, config, extra, ...).
    """
    from rsna_cspine.errors import CSpineError

    path = Path(path)
    if not path.is_file():
        raise CSpineError("checkpoint not found", path)
    try:
        # weights_only=False: our own files carry numpy RNG state and configs, not just tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CSpineError(f"unreadable checkpoint ({exc.__class__.__name__}: {exc})", path) from exc
    if model is not None:
        unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        restore_rng_state(state["rng"])
    return state


# ----------------------------------------------------------------------------------------------
# Run folder: summary.csv, curves, early stopping
# ----------------------------------------------------------------------------------------------


class SummaryLog:
    """Per-epoch metrics in ``run_dir/summary.csv`` (timm style) plus ``curves.png``.

    On resume, rows of epochs after the checkpoint's are dropped so the file matches the restored state.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int | None = None) -> None:
        self.path = Path(run_dir) / "summary.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None and self.path.is_file():
            with self.path.open() as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= resume_epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        if not self.rows:
            return
        fields: list[str] = []
        for row in self.rows:
            fields.extend(k for k in row if k not in fields)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
        self.plot()

    def plot(self) -> Path | None:
        """Draw every numeric column against epoch into ``curves.png`` (losses and metrics apart)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is a nicety, never a reason to stop training
            return None
        epochs = [int(r["epoch"]) for r in self.rows]
        columns = [k for k in self.rows[0] if k not in ("epoch", "lr", "time_s")]
        loss_cols = [c for c in columns if "loss" in c]
        metric_cols = [c for c in columns if c not in loss_cols]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, cols, title in ((axes[0], loss_cols, "losses"), (axes[1], metric_cols, "metrics")):
            for col in cols:
                values = []
                for r in self.rows:
                    try:
                        values.append(float(r.get(col, "nan")))
                    except (TypeError, ValueError):
                        values.append(float("nan"))
                ax.plot(epochs, values, marker="o", label=col)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if cols:
                ax.legend(fontsize=7)
        fig.tight_layout()
        out = self.path.with_name("curves.png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return out


@dataclass
class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` epochs."""

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


class WeightedEpochSampler(torch.utils.data.Sampler[int]):
    """Draws one epoch of indices with replacement in proportion to ``weights``, the same on every rank.

    torch's ``WeightedRandomSampler`` has no DDP split; here every rank draws the full epoch from the
    same ``(seed + epoch)`` generator and keeps every ``world_size``-th index, so the ranks share one
    draw without overlap and a resumed run draws what the uninterrupted one did.

    Args:
        weights: one non-negative weight per item (not all zero).
        num_samples: indices per epoch over all ranks.
        generator: the epoch's generator.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, weights: np.ndarray, num_samples: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if self.weights.ndim != 1 or (self.weights < 0).any() or float(self.weights.sum()) <= 0:
            raise ValueError("sampling weights must be one non-negative value per item, not all zero")
        self.world_size = max(world_size, 1)
        self.num_samples = num_samples - num_samples % self.world_size
        self.generator, self.rank = generator, rank

    def __iter__(self):
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)
        return iter(drawn[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size


def prepare_run_dir(run_dir: str | Path, config: Any, resume: bool) -> Path:
    """Create the run folder and write ``config.yaml``; refuse to overwrite a finished run unless resuming."""
    from rsna_cspine.config import save_config
    from rsna_cspine.errors import ConfigError

    run_dir = Path(run_dir)
    if not resume and (run_dir / "last.pt").exists():
        raise ConfigError("run folder already holds a checkpoint; pass --resume or choose another folder", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    return run_dir


def fold_of(studies: list[str], n_folds: int, seed: int = 42) -> dict[str, int]:
    """Deterministic study → fold assignment (sklearn GroupKFold semantics: a study is never split).

    Args:
        studies: study UIDs (duplicates allowed; a study keeps one fold).
        n_folds: number of folds.
        seed: shuffles the groups so folds do not follow UID order.
    """
    from sklearn.model_selection import GroupKFold

    unique = sorted(set(studies))
    folds: dict[str, int] = {}
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(unique, groups=unique)):
        for i in val_idx:
            folds[unique[i]] = k
    return folds

"""The one training loop of every stage (in the spirit of nnU-Net's ``run_training``): a
:class:`TrainingTask` supplies the model, the data, the loss and the scoring, :func:`fit` does the rest.

What :func:`fit` does for every task: a timm optimiser and per-update schedule, AMP (``engine.amp_dtype``)
with a GradScaler where float16 needs one, gradient clipping, a weight average (``train.ema_decay``),
validation every ``train.val_every`` epochs (from ``train.val_from`` of the run on) and after the last one, early stopping on ``task.monitor``,
``last.pt`` every epoch and ``best.pt`` on improvement (with every RNG state, so ``resume`` repeats an
uninterrupted run on CPU), ``summary.csv`` + ``curves.png``, a wall-clock budget that the DDP ranks agree
on and that the learning-rate schedule is fitted to (``engine.TimeBudget``), and DDP under torchrun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from rsna_cspine.config import to_dict
from rsna_cspine.engine.checkpoints import load_checkpoint, save_checkpoint
from rsna_cspine.engine.devices import make_grad_scaler, training_autocast
from rsna_cspine.engine.distributed import DistContext, all_reduce_mean, any_rank, barrier, unwrap_model, wrap_model
from rsna_cspine.engine.runlog import SummaryLog
from rsna_cspine.engine.schedules import EarlyStopping, TimeBudget, make_model_ema
from rsna_cspine.training.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)


class LoopConfig(Protocol):
    """What :func:`fit` reads of a stage's config: every stage config has these sections."""

    seed: int
    train: TrainConfig
    optim: OptimConfig


class TrainingTask:
    """What one stage gives :func:`fit`. Subclasses set the attributes and override the methods they need.

    Attributes:
        model: the bare model, already on the training device; ``model(*inputs(batch))`` gives the
            outputs :meth:`loss` reads.
        has_validation: whether :meth:`validate` is called (without it every epoch counts as best).
        monitor: the :meth:`validate` key that early stopping and ``best.pt`` follow.
        mode: ``min`` or ``max``: which direction of ``monitor`` is better.
    """

    model: torch.nn.Module
    has_validation: bool = False
    monitor: str = "val_loss"
    mode: str = "min"

    def train_loader(self, epoch: int, ctx: DistContext) -> Iterable[dict[str, torch.Tensor]]:
        """This epoch's training batches (this rank's share under torchrun); must have a ``len``."""
        raise NotImplementedError

    def inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        """A batch's positional model inputs on ``device`` (default: its ``image``)."""
        return (batch["image"].to(device, non_blocking=True),)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch (the task moves the targets it needs to the device)."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics of the bare model, ``monitor`` included; called on every rank."""
        return {}

    def on_best(self) -> None:
        """Rank 0, right after ``best.pt`` was written: keep what the last validation produced."""

    def finish(self, best_path: Path) -> None:
        """Rank 0, after the last epoch: final outputs (re-scored with ``best.pt`` when it exists)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Task facts stored in every checkpoint's ``extra`` (fold, class names, study split, ...)."""
        return {}


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The timm optimiser ``optim`` names (weight decay spares biases and norms)."""
    return create_optimizer_v2(model, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                               momentum=optim.momentum)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int, updates_per_epoch: int) -> Any:
    """The timm schedule ``optim`` names over ``epochs``, stepped after every update."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=optim.sched, num_epochs=epochs, warmup_epochs=optim.warmup_epochs, warmup_lr=optim.warmup_lr,
        min_lr=optim.min_lr, decay_epochs=optim.decay_epochs, decay_rate=optim.decay_rate, step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return scheduler


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    train: TrainConfig,
    *,
    epoch: int,
    ctx: DistContext | None = None,
    schedule_position: Callable[[float], float] | None = None,
    ema: Any | None = None,
    progress: bool = True,
) -> float:
    """One pass over ``loader``; returns the mean training loss per item, averaged over ranks.

    Args:
        model: the (possibly DDP-wrapped) model; left in train mode.
        loader: this epoch's batches (``len`` gives the updates per epoch).
        task: supplies ``inputs`` and ``loss``.
        optimizer: the optimiser.
        scheduler: a timm scheduler, stepped after every update.
        scaler: AMP GradScaler (inactive unless float16).
        device: where the model is.
        train: the loop settings (``amp``, ``grad_clip``, ``epochs``).
        epoch: 0-based epoch index.
        ctx: the torchrun context (plain run when None).
        schedule_position: maps the run's fractional epoch to the schedule's (``TimeBudget.position``).
        ema: the weight average (``engine.make_model_ema``), updated after every step.
        progress: tqdm bar.
    """
    ctx = ctx or DistContext()
    model.train()
    total, count = 0.0, 0
    n_batches = max(len(loader), 1)  # type: ignore[arg-type]
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train.epochs}", leave=False, disable=None if progress else True)
    for step, batch in enumerate(bar):
        inputs = task.inputs(batch, device)
        with training_autocast(device, train.amp):
            outputs = model(*inputs)
        loss = task.loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(unwrap_model(model), step=epoch * n_batches + step + 1)
        at = epoch + (step + 1) / n_batches
        at = schedule_position(at) if schedule_position is not None else at
        scheduler.step_update(num_updates=round(at * n_batches))
        total += float(loss.detach()) * len(inputs[0])
        count += len(inputs[0])
        bar.set_postfix(loss=f"{total / count:.4f}")
    return all_reduce_mean(total / max(count, 1), ctx)


def fit(
    task: TrainingTask,
    cfg: LoopConfig,
    run_dir: Path,
    *,
    device: torch.device,
    ctx: DistContext | None = None,
    resume: bool = False,
    started: float | None = None,
    progress: bool = True,
) -> Path:
    """Train ``task`` as ``cfg.train`` and ``cfg.optim`` say; ``run_dir`` must exist (``engine.prepare_run_dir``).

    With ``train.ema_decay`` > 0 the weight average is what is validated and what both checkpoints hold
    as ``model`` (so every predictor uses it unchanged); ``last.pt`` keeps the raw training weights in
    ``extra["train_weights"]`` for ``resume``.

    Args:
        task: model, data, loss and scoring of the stage being trained.
        cfg: the stage's config (``seed``, ``train``, ``optim``; stored whole in every checkpoint).
        run_dir: where checkpoints and the summary go.
        device: the training device (``task.model`` is already on it).
        ctx: the torchrun context (plain run when None).
        resume: continue from ``run_dir/last.pt`` when it exists.
        started: ``time.monotonic()`` at the start of the command; the budget counts from there (data
            preparation included). Default: now.
        progress: tqdm bars (rank 0 only).

    Returns:
        ``run_dir``.
    """
    ctx = ctx or DistContext()
    train = cfg.train
    started = time.monotonic() if started is None else started
    model = task.model
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, train.epochs, len(task.train_loader(0, ctx)))  # type: ignore[arg-type]
    scaler = make_grad_scaler(device, train.amp)
    stopper = EarlyStopping(patience=train.patience, mode=task.mode)
    budget = TimeBudget(train.epochs, train.max_minutes * 60.0)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    start_epoch, earlier_s, train_s, val_s, train_weights = 0, 0.0, 0.0, 0.0, None
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                restore_rng=True, map_location=device)
        start_epoch, extra = int(state["epoch"]), state["extra"]
        stopper.load_state_dict(extra.get("early_stopping", {}))
        budget.load_state_dict(extra.get("time_budget", {}))
        earlier_s, train_s, val_s = (float(extra.get(k, 0.0)) for k in ("elapsed_s", "train_s", "val_s"))
        train_weights = extra.get("train_weights")
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    elif resume:
        log.warning("--resume given but %s has no last.pt: starting from scratch", run_dir)
    # After a resume `model` holds the checkpoint's predicting weights (the average, when there is one).
    ema = make_model_ema(model, train.ema_decay)
    if train_weights is not None:
        model.load_state_dict(train_weights)
    model = wrap_model(model, ctx, device)
    summary = SummaryLog(run_dir, resume_epoch=start_epoch if resume else None) if ctx.is_main else None
    config = to_dict(cfg)

    def spent() -> float:
        # The ranks' mean clock: they must stop, validate and save at the same epoch, or the next
        # collective hangs.
        return earlier_s + all_reduce_mean(time.monotonic() - started, ctx)

    epochs = tqdm(range(start_epoch, train.epochs), desc="epochs", disable=None if progress and ctx.is_main else True)
    for epoch in epochs:
        tick = time.monotonic()
        train_loss = train_one_epoch(
            model, task.train_loader(epoch, ctx), task, optimizer, scheduler, scaler, device, train, epoch=epoch,
            ctx=ctx, schedule_position=budget.position, ema=ema, progress=progress and ctx.is_main,
        )
        # Stop before an epoch that would overrun the budget, this epoch's validation included.
        out_of_time = any_rank(not budget.next_epoch_fits(spent() + (val_s if task.has_validation else 0.0)), ctx)
        last = out_of_time or epoch + 1 == train.epochs
        due = (epoch + 1) % train.val_every == 0 and epoch + 1 >= train.val_from * budget.planned
        scored = task.has_validation and (last or due)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
        improved = not task.has_validation  # without validation the latest weights are the ones to keep
        if scored:
            tick_val = time.monotonic()
            metrics = task.validate(ema.module if ema is not None else unwrap_model(model))
            val_s = all_reduce_mean(time.monotonic() - tick_val, ctx)
            row.update(metrics)
            improved = stopper.step(metrics[task.monitor])
        epoch_s = all_reduce_mean(time.monotonic() - tick, ctx)
        row.update({"lr": float(optimizer.param_groups[0]["lr"]), "time_s": epoch_s})
        train_s += epoch_s
        spent_s = spent()
        budget.update(epochs_done=epoch + 1, train_s=train_s, spent_s=spent_s, last_epoch_s=epoch_s)
        if ctx.is_main:
            extra = {"early_stopping": stopper.state_dict(), "time_budget": budget.state_dict(), "elapsed_s": spent_s,
                     "train_s": train_s, "val_s": val_s, **task.checkpoint_extra()}
            predicting = ema.module if ema is not None else model
            resume_extra = {**extra, "train_weights": unwrap_model(model).state_dict()} if ema is not None else extra
            save_checkpoint(last_path, model=predicting, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            epoch=epoch + 1, best_score=stopper.best, config=config, extra=resume_extra)
            if improved:
                save_checkpoint(best_path, model=predicting, epoch=epoch + 1, best_score=stopper.best, config=config,
                                extra=extra)
                task.on_best()
            summary.append(row)  # type: ignore[union-attr]
            epochs.set_postfix(loss=f"{train_loss:.4f}", **({task.monitor: f"{row[task.monitor]:.4f}"} if scored else {}))
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        barrier(ctx)
        if scored and stopper.should_stop:
            log.info("early stopping: no better %s in %d validations", task.monitor, stopper.bad_epochs)
            break
        if out_of_time:
            log.info("time budget: %.1f of %.1f min used; the next epoch would overrun it, stopping after epoch %d",
                     spent_s / 60, train.max_minutes, epoch + 1)
            break

    if ctx.is_main:
        task.finish(best_path)
    barrier(ctx)
    return run_dir

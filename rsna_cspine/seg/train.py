"""Train the stage-1 vertebra segmenter on one fold: cache → MONAI UNet → Dice+CE → best.pt by val Dice."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from rsna_cspine.config import to_dict
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.engine import (
    DistContext,
    EarlyStopping,
    SummaryLog,
    TimeBudget,
    all_reduce_mean,
    any_rank,
    autocast,
    barrier,
    cleanup_distributed,
    fold_of,
    init_distributed,
    load_checkpoint,
    make_grad_scaler,
    prepare_run_dir,
    resolve_device,
    save_checkpoint,
    seed_everything,
    wrap_model,
)
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.data import build_transforms, make_dataset, make_loader
from rsna_cspine.seg.model import build_model, grid_divisor
from rsna_cspine.seg.preprocess import THORACIC_MODES, build_cache, num_classes

log = logging.getLogger(__name__)


def resolve_config(cfg: SegConfig) -> SegConfig:
    """Fill ``{fold}`` in ``run_dir`` and check settings that would otherwise fail deep inside training.

    Args:
        cfg: the loaded config.
    """
    if cfg.data.thoracic not in THORACIC_MODES:
        raise ConfigError(f"data.thoracic must be one of {THORACIC_MODES}, got {cfg.data.thoracic!r}")
    divisor = grid_divisor(cfg.model)
    if any(int(g) % divisor for g in cfg.data.grid):
        raise ConfigError(f"data.grid {tuple(cfg.data.grid)} must be divisible by {divisor} for this model")
    patch = cfg.train.patch_size
    if any(int(p) % divisor or int(p) > int(g) or int(p) < 0 for p, g in zip(patch, cfg.data.grid)):
        raise ConfigError(f"train.patch_size {tuple(patch)} must be 0 or a multiple of {divisor} within the grid")
    if cfg.fold >= cfg.train.n_folds:
        raise ConfigError(f"fold {cfg.fold} is out of range for train.n_folds={cfg.train.n_folds}")
    return dataclasses.replace(cfg, run_dir=cfg.run_dir.format(fold=cfg.fold))


def labelled_studies(root: str | Path, max_studies: int = 0) -> list[str]:
    """Training studies (train.csv) that have a segmentation, sorted; the first ``max_studies`` if > 0.

    Args:
        root: Kaggle-layout folder.
        max_studies: cap on the number of studies (0 = no cap).
    """
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels

    layout = KaggleLayout(root)
    labels = read_train_labels(layout.train_csv)
    uids = sorted(u for u in labels["StudyInstanceUID"].astype(str).unique() if layout.segmentation_path(u))
    if not uids:
        raise LayoutError("no training study has a segmentation", layout.segmentations)
    return uids[:max_studies] if max_studies > 0 else uids


def split_studies(uids: Sequence[str], fold: int, n_folds: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) studies for ``fold`` (GroupKFold by study); ``fold < 0`` → all train, no val.

    Args:
        uids: available studies.
        fold: validation fold.
        n_folds: number of folds.
        seed: fold-assignment seed.
    """
    if fold < 0:
        return list(uids), []
    folds = fold_of(list(uids), n_folds, seed)
    return [u for u in uids if folds[u] != fold], [u for u in uids if folds[u] == fold]


def class_names(thoracic: str) -> list[str]:
    """Names of the foreground classes in channel order (C1..C7 [+ thoracic])."""
    return list(VERTEBRAE) + (["thoracic"] if thoracic == "class" else [])


def make_loss(cfg: SegConfig) -> DiceCELoss:
    """Dice + cross-entropy over softmax outputs, labels given as class indices."""
    return DiceCELoss(
        to_onehot_y=True, softmax=True, lambda_dice=cfg.train.lambda_dice, lambda_ce=cfg.train.lambda_ce
    )


def train_one_epoch(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    amp: bool,
    grad_clip: float,
    progress: bool = True,
    desc: str = "train",
) -> float:
    """One pass over ``loader``; returns the mean batch loss.

    Args:
        model: network in train mode after the call.
        loader: yields ``{"image", "label"}`` batches.
        loss_fn: Dice+CE loss.
        optimizer: the optimiser.
        scaler: AMP grad scaler (inactive on CPU).
        device: where to compute.
        amp: mixed precision on GPU.
        grad_clip: max gradient norm (0 = off).
        progress: tqdm bar.
        desc: bar label.
    """
    model.train()
    losses: list[float] = []
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True)
    for batch in bar:
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(model(image), label)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)) if losses else float("nan")


@torch.inference_mode()
def validate(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: torch.nn.Module,
    device: torch.device,
    n_classes: int,
    *,
    amp: bool,
    progress: bool = True,
) -> tuple[float, np.ndarray]:
    """Validation loss and Dice per foreground class at grid resolution (NaN where a class is absent).

    Args:
        model: network (set to eval here).
        loader: validation batches.
        loss_fn: Dice+CE loss.
        device: where to compute.
        n_classes: network output channels.
        amp: mixed precision on GPU.
        progress: tqdm bar.
    """
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    losses: list[float] = []
    for batch in tqdm(loader, desc="val", leave=False, disable=None if progress else True):
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        with autocast(device, amp):
            logits = model(image)
        losses.append(float(loss_fn(logits.float(), label)))
        pred = one_hot(logits.argmax(1, keepdim=True), n_classes)
        metric(y_pred=pred, y=one_hot(label.long(), n_classes))
    dice = metric.aggregate().cpu().numpy().astype(np.float64)
    return float(np.mean(losses)) if losses else float("nan"), dice


def train_segmentation(cfg: SegConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one fold of the stage-1 segmenter and return its run folder.

    Writes ``config.yaml`` (resolved), ``summary.csv``/``curves.png`` per epoch (losses, val Dice mean and
    per vertebra, lr, time), ``last.pt`` every epoch and ``best.pt`` on the best validation mean Dice.
    Stops at ``train.epochs``, on early stopping, or before an epoch that would overrun ``train.max_minutes``;
    with a budget the cosine schedule is fitted to the epochs that fit in it (``engine.TimeBudget``).

    Args:
        cfg: the run config (``run_dir`` may contain ``{fold}``).
        resume: continue from ``run_dir/last.pt`` (weights, optimiser, scheduler, scaler, RNG, budget).
        progress: tqdm bars.
    """
    cfg = resolve_config(cfg)
    from rsna_cspine.io.kaggle import KaggleLayout

    device = resolve_device(cfg.device)
    ctx = init_distributed(device)
    try:
        layout = KaggleLayout(cfg.data.root)
        uids = labelled_studies(cfg.data.root, cfg.data.max_studies)
        cache_args = dict(grid=cfg.data.grid, hu_window=cfg.data.hu_window, antialias=cfg.data.antialias)
        cached: dict[str, Path] = {}
        if ctx.is_main:
            cached = build_cache(layout, uids, cfg.data.cache_dir, progress=progress, **cache_args)
        barrier(ctx)
        if not ctx.is_main:  # the main rank has just built (or refreshed) every file
            cached = {u: Path(cfg.data.cache_dir) / f"{u}.npz" for u in uids}
            cached = {u: p for u, p in cached.items() if p.is_file()}
        usable = [u for u in uids if u in cached]
        train_uids, val_uids = split_studies(usable, cfg.fold, cfg.train.n_folds, cfg.train.fold_seed)
        if not train_uids:
            raise LayoutError(f"fold {cfg.fold} leaves no training study", cfg.data.root)
        log.info("seg fold %d: %d train / %d val studies", cfg.fold, len(train_uids), len(val_uids))
        return fit_segmentation(
            cfg,
            [cached[u] for u in train_uids],
            [cached[u] for u in val_uids],
            resume=resume,
            progress=progress,
            ctx=ctx,
            device=device,
            extra={"train_uids": train_uids, "val_uids": val_uids},
        )
    finally:
        cleanup_distributed(ctx)


def fit_segmentation(
    cfg: SegConfig,
    train_paths: Sequence[Path],
    val_paths: Sequence[Path],
    *,
    resume: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
    device: torch.device | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """The training loop over already cached studies (``train_segmentation`` without the data set-up).

    Args:
        cfg: the run config (``run_dir`` may contain ``{fold}``).
        train_paths: cache files to train on.
        val_paths: cache files to validate on (empty: keep the latest weights as best).
        resume: continue from ``run_dir/last.pt``.
        progress: tqdm bars.
        ctx: torchrun context (plain single process when None).
        device: where to train (from ``cfg.device`` when None).
        extra: stored in every checkpoint (e.g. the study split).
    """
    cfg = resolve_config(cfg)
    device = device or resolve_device(cfg.device)
    ctx = ctx or DistContext()
    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if ctx.is_main:
        prepare_run_dir(run_dir, cfg, resume)
    barrier(ctx)
    n_classes = num_classes(cfg.data.thoracic)
    names = class_names(cfg.data.thoracic)
    model = build_model(cfg.model, n_classes).to(device)
    model = wrap_model(model, ctx, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(cfg.train.epochs, 1),
        lr_min=cfg.train.min_lr,
        warmup_t=cfg.train.warmup_epochs,
        warmup_lr_init=cfg.train.lr * 0.1,
    )
    scaler = make_grad_scaler(device, cfg.train.amp)
    loss_fn = make_loss(cfg)
    stopper = EarlyStopping(patience=cfg.train.patience, mode="max")
    start_epoch, elapsed = 0, 0.0
    budget = TimeBudget(cfg.train.epochs, cfg.train.max_minutes * 60.0)
    if resume and (run_dir / "last.pt").is_file():
        state = load_checkpoint(
            run_dir / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            restore_rng=True, map_location=device,
        )
        start_epoch = int(state["epoch"])
        stopper.load_state_dict(state["extra"].get("early_stopping", {}))
        elapsed = float(state["extra"].get("elapsed_s", 0.0))
        budget.load_state_dict(state["extra"].get("time_budget", {}))
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    elif resume:
        log.warning("--resume given but %s has no last.pt: starting from scratch", run_dir)
    summary = SummaryLog(run_dir, resume_epoch=start_epoch if resume else None) if ctx.is_main else None

    train_tf = build_transforms(
        cfg.augment, cfg.data.grid, cfg.data.thoracic, train=True,
        patch_size=cfg.train.patch_size, patch_foreground=cfg.train.patch_foreground, hu_window=cfg.data.hu_window,
    )
    train_ds = make_dataset(train_paths, train_tf)
    val_ds = make_dataset(val_paths, build_transforms(cfg.augment, cfg.data.grid, cfg.data.thoracic, train=False))
    last_val_s = 0.0
    epochs = tqdm(range(start_epoch, cfg.train.epochs), desc="seg epochs", disable=None if progress and ctx.is_main else True)
    for epoch in epochs:
        t0 = time.perf_counter()
        scheduler.step(budget.position(epoch))
        lr = optimizer.param_groups[0]["lr"]
        loader = make_loader(
            train_ds, batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
            num_workers=cfg.train.num_workers, rank=ctx.rank, world_size=ctx.world_size,
        )
        train_loss = train_one_epoch(
            model, loader, loss_fn, optimizer, scaler, device, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip,
            progress=progress and ctx.is_main, desc=f"epoch {epoch + 1}",
        )
        train_loss = all_reduce_mean(train_loss, ctx)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
        # Ranks agree on the clock (their mean) so they stop, validate and save at the same epoch. The
        # run stops before an epoch that would overrun the budget (this epoch's validation included).
        spent = elapsed + all_reduce_mean(time.perf_counter() - t0, ctx)
        out_of_time = any_rank(not budget.next_epoch_fits(spent + last_val_s), ctx)
        last_epoch = out_of_time or epoch + 1 == cfg.train.epochs
        scored = bool(val_paths) and (last_epoch or (epoch + 1) % max(cfg.train.val_every, 1) == 0)
        if scored:
            # Every rank scores the whole validation set so that best/early-stop decisions agree.
            val_loader = make_loader(val_ds, batch_size=1, shuffle=False, seed=cfg.seed, epoch=epoch,
                                     num_workers=cfg.train.num_workers)
            t_val = time.perf_counter()
            val_loss, dice = validate(model, val_loader, loss_fn, device, n_classes, amp=cfg.train.amp,
                                      progress=progress and ctx.is_main)
            last_val_s = all_reduce_mean(time.perf_counter() - t_val, ctx)
            vertebra_dice = dice[: len(VERTEBRAE)]
            score = float(np.nanmean(vertebra_dice)) if np.isfinite(vertebra_dice).any() else 0.0
            row.update({"val_loss": val_loss, "val_dice_mean": score})
            row.update({f"val_dice_{n}": float(d) for n, d in zip(names, dice)})
        # Without validation (fold -1) the latest weights are the ones to keep.
        is_best = stopper.step(score) if scored else not val_paths
        epoch_s = all_reduce_mean(time.perf_counter() - t0, ctx)
        elapsed += epoch_s
        budget.update(epochs_done=epoch + 1, train_s=elapsed, spent_s=elapsed, last_epoch_s=epoch_s)
        row.update({"lr": lr, "time_s": time.perf_counter() - t0})
        if ctx.is_main:
            summary.append(row)
            save_checkpoint(
                run_dir / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                epoch=epoch + 1, best_score=stopper.best, config=to_dict(cfg),
                extra={"early_stopping": stopper.state_dict(), "elapsed_s": elapsed, "time_budget": budget.state_dict(),
                       "classes": names, **(extra or {})},
            )
            if is_best:
                shutil.copyfile(run_dir / "last.pt", run_dir / "best.pt")
            epochs.set_postfix(loss=f"{train_loss:.4f}", dice=f"{row.get('val_dice_mean', math.nan):.4f}")
            log.info("epoch %d: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        barrier(ctx)
        if scored and stopper.should_stop:
            log.info("early stopping after epoch %d (best val Dice %.4f)", epoch + 1, stopper.best)
            break
        if out_of_time:
            log.info("time budget: %.1f of %.1f min used; the next epoch would overrun, stopping after epoch %d",
                     elapsed / 60, cfg.train.max_minutes, epoch + 1)
            break
    return run_dir

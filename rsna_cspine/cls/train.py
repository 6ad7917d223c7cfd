"""Train the stage-2 fracture classifier on one fold and write its out-of-fold predictions; home of the
one training loop (:func:`fit`) that every classification mode (vertebra stacks, 2D images) runs through.

Data order depends only on (seed, epoch) and each item's augmentation only on (seed, epoch, item), so a
run resumed from ``last.pt`` repeats the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from rsna_cspine.aggregate import PatientCalibration, fit_patient_calibration, patient_overall
from rsna_cspine.cls.config import ClsConfig, ClsOptimConfig
from rsna_cspine.cls.data import StackAugment, VertebraDataset, vertebra_items
from rsna_cspine.cls.model import build_classifier, check_pretrained_file
from rsna_cspine.config import to_dict
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRA_WEIGHTS, VERTEBRAE
from rsna_cspine.crops.cache import build_crop_cache
from rsna_cspine.engine import (
    DistContext,
    EarlyStopping,
    SummaryLog,
    TimeBudget,
    WeightedEpochSampler,
    all_reduce_mean,
    any_rank,
    autocast,
    barrier,
    fold_of,
    load_checkpoint,
    make_grad_scaler,
    make_model_ema,
    prepare_run_dir,
    run_seeded_distributed,
    save_checkpoint,
    unwrap_model,
    wrap_model,
)
from rsna_cspine.errors import LayoutError
from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
from rsna_cspine.metric import prior_predictions, score_arrays, weighted_log_loss

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The generic loop
# ----------------------------------------------------------------------------------------------


class _HasNumWorkers(Protocol):
    num_workers: int


class LoopConfig(Protocol):
    """Run settings :func:`fit` reads; ``ClsConfig`` and ``TwoDConfig`` both carry them under these names."""

    seed: int
    epochs: int
    batch_size: int
    amp: bool
    grad_clip: float
    early_stopping_patience: int
    max_minutes: float
    ema_decay: float
    optim: ClsOptimConfig
    data: _HasNumWorkers


class TrainingTask(Protocol):
    """What one classification mode gives :func:`fit`: the model, the data and its own scoring.

    Attributes:
        model: the bare model, already on the training device; ``model(batch["image"])`` gives the
            outputs :meth:`loss` reads.
        train_set: training items (each a dict with at least ``image``); a ``set_epoch(epoch)`` method,
            when present, is called before each epoch so augmentation can depend on the epoch.
        has_validation: whether :meth:`validate` is called (without it every epoch counts as best).
        monitor: the :meth:`validate` key early stopping and ``best.pt`` follow.
        mode: ``min`` or ``max``: which direction of ``monitor`` is better.
    """

    model: torch.nn.Module
    train_set: Dataset
    has_validation: bool
    monitor: str
    mode: str

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch (the task moves the targets it needs to the device)."""

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics of the bare model, ``monitor`` included; called on every rank."""

    def on_best(self) -> None:
        """Rank 0, right after ``best.pt`` was written: keep what the last validation produced."""

    def finish(self, best_path: Path) -> None:
        """Rank 0, after the last epoch: final outputs (re-scored with ``best.pt`` when it exists)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Task facts stored in every checkpoint's ``extra`` (fold, class names, ...)."""


def _train_loader(dataset: Dataset, cfg: LoopConfig, ctx: DistContext, epoch: int) -> DataLoader:
    """This epoch's loader; its order comes from a generator seeded with (seed + epoch).

    A dataset with a ``sample_weights`` array (one per item, or None) is drawn with replacement in
    proportion to it, an epoch as long as the dataset; otherwise every item is seen once, shuffled.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    sampler: torch.utils.data.Sampler[int] | None = None
    weights = getattr(dataset, "sample_weights", None)
    if weights is not None:
        sampler = WeightedEpochSampler(weights, len(dataset), generator, ctx.rank, ctx.world_size)  # type: ignore[arg-type]
    elif ctx.enabled:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.data.num_workers,
        drop_last=len(dataset) > cfg.batch_size * max(ctx.world_size, 1),  # type: ignore[arg-type]
        pin_memory=torch.cuda.is_available(),
    )


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's positional model inputs on ``device``: the images, then the vertebra index where the
    batch carries one (stage 2; the 2D mode's batches have none)."""
    image = batch["image"].to(device, non_blocking=True)
    return (image, batch["vertebra"].to(device)) if "vertebra" in batch else (image,)


def _train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: object,
    scaler: torch.amp.GradScaler,
    cfg: LoopConfig,
    device: torch.device,
    epoch: int,
    ctx: DistContext,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    schedule_position: Callable[[float], float] | None = None,
    ema: Any | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss over ranks.

    ``loss_fn`` defaults to the vertebra loss of a ``ClsConfig`` run, so callers that time the stage-2
    step alone (``benchmarks/bench_training.py``) keep working. ``schedule_position`` maps the run's
    fractional epoch to the scheduler's (``TimeBudget.position``; identity by default). ``ema``
    (``engine.make_model_ema``) follows the weights after every optimiser step.
    """
    if loss_fn is None:
        slice_weight = float(getattr(cfg, "slice_loss_weight", 0.0))
        loss_fn = lambda out, batch: vertebra_batch_loss(out, batch, slice_weight, device)  # noqa: E731
    model.train()
    total, count = 0.0, 0
    n_batches = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if ctx.is_main else True)
    for step, batch in enumerate(bar):
        inputs = model_inputs(batch, device)
        with autocast(device, cfg.amp):
            out = model(*inputs)
        loss = loss_fn(out, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(unwrap_model(model), step=epoch * n_batches + step + 1)
        at = epoch + (step + 1) / n_batches
        at = schedule_position(at) if schedule_position is not None else at
        scheduler.step_update(num_updates=round(at * n_batches))  # type: ignore[attr-defined]
        total += float(loss.detach()) * len(inputs[0])
        count += len(inputs[0])
        bar.set_postfix(loss=f"{total / count:.4f}")
    return all_reduce_mean(total / max(count, 1), ctx)


def fit(
    task: TrainingTask,
    cfg: LoopConfig,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    ctx: DistContext,
    started: float | None = None,
) -> Path:
    """The training loop every classification mode uses.

    Seeded data order, AMP and gradient clipping, a timm optimiser and per-update scheduler, early
    stopping on ``task.monitor``, ``last.pt`` every epoch and ``best.pt`` on improvement (with all RNG
    states, so ``resume`` repeats an uninterrupted run), ``summary.csv`` + ``curves.png`` and a time
    budget that every DDP rank agrees on (the schedule is fitted to the epochs that fit: ``TimeBudget``).
    With ``cfg.ema_decay`` > 0 a moving average of the weights is what is validated and what both
    checkpoints hold as ``model`` (so every predictor uses it unchanged); ``last.pt`` keeps the raw
    training weights in ``extra["train_weights"]`` for ``resume``.
    ``run_dir`` must already exist (``engine.prepare_run_dir``).

    Args:
        task: model, data and scoring of the mode being trained.
        cfg: run settings (see :class:`LoopConfig`).
        run_dir: where checkpoints and the summary go.
        resume: continue from ``run_dir/last.pt`` when it exists.
        device: the training device (``task.model`` is already on it).
        ctx: the torchrun context.
        started: ``time.monotonic()`` at the start of the run (data preparation counts against
            ``cfg.max_minutes``); default now.

    Returns:
        ``run_dir``.
    """
    started = time.monotonic() if started is None else started
    model = task.model
    optimizer = create_optimizer_v2(
        model, opt=cfg.optim.opt, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum
    )
    updates_per_epoch = len(_train_loader(task.train_set, cfg, ctx, 0))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.optim.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.optim.warmup_epochs,
        warmup_lr=cfg.optim.warmup_lr, min_lr=cfg.optim.min_lr, decay_epochs=cfg.optim.decay_epochs,
        decay_rate=cfg.optim.decay_rate, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    scaler = make_grad_scaler(device, cfg.amp)
    stopper = EarlyStopping(patience=cfg.early_stopping_patience, mode=task.mode)
    budget = TimeBudget(cfg.epochs, cfg.max_minutes * 60.0)
    start_epoch = 0
    train_weights = None
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                restore_rng=True, map_location=device)
        start_epoch = int(state["epoch"])
        stopper.load_state_dict(state["extra"].get("early_stopping", {}))
        budget.load_state_dict(state["extra"].get("time_budget", {}))
        train_weights = state["extra"].get("train_weights")
        log.info("resumed from %s after epoch %d", last_path, start_epoch)
    # After a resume `model` holds the checkpoint's predicting weights (the average, when there is one).
    ema = make_model_ema(model, cfg.ema_decay)
    if train_weights is not None:
        model.load_state_dict(train_weights)
    model = wrap_model(model, ctx, device)
    summary = SummaryLog(run_dir, resume_epoch=start_epoch if resume else None) if ctx.is_main else None
    config = to_dict(cfg)
    train_s = 0.0

    for epoch in range(start_epoch, cfg.epochs):
        if stopper.should_stop:
            log.info("early stopping: no better %s for %d epochs", task.monitor, stopper.bad_epochs)
            break
        # Ranks agree on the clock (their mean): they must stop together or the next collective hangs.
        spent = all_reduce_mean(time.monotonic() - started, ctx)
        if epoch > start_epoch and any_rank(not budget.next_epoch_fits(spent), ctx):
            log.info("time budget: %.1f of %.1f min used; stopping before epoch %d", spent / 60, cfg.max_minutes, epoch + 1)
            break
        tick = time.monotonic()
        train_loss = _train_one_epoch(model, _train_loader(task.train_set, cfg, ctx, epoch), optimizer, scheduler,
                                      scaler, cfg, device, epoch, ctx, loss_fn=task.loss,
                                      schedule_position=budget.position, ema=ema)
        scheduler.step(epoch + 1)
        row: dict[str, float | int] = {"epoch": epoch + 1, "train_loss": train_loss}
        improved = True
        if task.has_validation:
            metrics = task.validate(ema.module if ema is not None else unwrap_model(model))
            row.update(metrics)
            improved = stopper.step(metrics[task.monitor])
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        row["time_s"] = time.monotonic() - tick
        epoch_s = all_reduce_mean(row["time_s"], ctx)
        train_s += epoch_s
        budget.update(epochs_done=epoch + 1 - start_epoch, train_s=train_s,
                      spent_s=all_reduce_mean(time.monotonic() - started, ctx), last_epoch_s=epoch_s)
        if ctx.is_main:
            extra = {"early_stopping": stopper.state_dict(), "time_budget": budget.state_dict(), **task.checkpoint_extra()}
            predicting = ema.module if ema is not None else model
            resume_extra = {**extra, "train_weights": unwrap_model(model).state_dict()} if ema is not None else extra
            save_checkpoint(last_path, model=predicting, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            epoch=epoch + 1, best_score=stopper.best, config=config, extra=resume_extra)
            if improved:
                save_checkpoint(best_path, model=predicting, epoch=epoch + 1, best_score=stopper.best, config=config,
                                extra=extra)
                task.on_best()
            summary.append(row)  # type: ignore[union-attr]
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        barrier(ctx)

    if ctx.is_main:
        task.finish(best_path)
    barrier(ctx)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Stage 2: vertebra stacks
# ----------------------------------------------------------------------------------------------


def fracture_loss(
    logit: torch.Tensor,
    label: torch.Tensor,
    slice_logits: torch.Tensor | None = None,
    slice_labels: torch.Tensor | None = None,
    slice_weight: float = 0.0,
    box_logits: torch.Tensor | None = None,
    box_maps: torch.Tensor | None = None,
    box_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Competition-weighted vertebra BCE plus optional per-slice and per-cell BCE on known slices.

    Positives weigh ``VERTEBRA_WEIGHTS[1]`` (2) and negatives ``VERTEBRA_WEIGHTS[0]`` (1), normalised by the
    weight sum as the metric does.

    Args:
        logit: ``(B,)`` vertebra logits.
        label: ``(B,)`` 0/1 targets.
        slice_logits: ``(B, N)`` or None.
        slice_labels: ``(B, N)`` in {-1, 0, 1}; -1 entries are ignored.
        slice_weight: multiplier of the slice term.
        box_logits: ``(B, N, h, w)`` per-cell logits on the feature grid, or None.
        box_maps: ``(B, N, S, S)`` where the boxes are in the crops (in [0, 1]); a cell's target is 1
            when any of its pixels is at least half covered (max-pooled to the ``h×w`` grid).
        box_weight: multiplier of the cell term (only slices whose label is known count).

    Returns:
        ``(total, vertebra_term)``.
    """
    neg_w, pos_w = VERTEBRA_WEIGHTS
    label = label.float()
    weights = label * pos_w + (1.0 - label) * neg_w
    per_item = F.binary_cross_entropy_with_logits(logit.float(), label, reduction="none")
    vertebra = (per_item * weights).sum() / weights.sum()
    total = vertebra
    if slice_weight > 0 and slice_logits is not None and slice_labels is not None:
        known = slice_labels >= 0
        if known.any():
            slice_term = F.binary_cross_entropy_with_logits(slice_logits.float()[known], slice_labels[known].float())
            total = total + slice_weight * slice_term
    if box_weight > 0 and box_logits is not None and box_maps is not None and slice_labels is not None:
        known = slice_labels >= 0
        if known.any():
            b, n, h, w = box_logits.shape
            cells = F.adaptive_max_pool2d(box_maps.float().flatten(0, 1)[:, None], (h, w)).view(b, n, h, w)
            box_term = F.binary_cross_entropy_with_logits(box_logits.float()[known], (cells[known] >= 0.5).float())
            total = total + box_weight * box_term
    return total, vertebra


def vertebra_batch_loss(
    outputs: dict[str, torch.Tensor | None],
    batch: dict[str, torch.Tensor],
    slice_weight: float,
    device: torch.device,
    box_weight: float = 0.0,
) -> torch.Tensor:
    """:func:`fracture_loss` of one :class:`VertebraDataset` batch (its targets moved to ``device``).

    Args:
        outputs: the classifier's ``logit``, ``slice_logits`` and ``box_logits``.
        batch: ``label``, ``slice_labels`` and ``box_map`` of the batch.
        slice_weight: weight of the per-slice term.
        device: where the outputs are.
        box_weight: weight of the per-cell term.
    """
    box_logits = outputs.get("box_logits")
    loss, _ = fracture_loss(
        outputs["logit"], batch["label"].to(device), outputs["slice_logits"], batch["slice_labels"].to(device),
        slice_weight, box_logits, batch["box_map"].to(device) if box_logits is not None else None, box_weight,
    )
    return loss


@dataclass
class _Split:
    train: pd.DataFrame
    val: pd.DataFrame
    val_labels: pd.DataFrame
    prior: np.ndarray


def _prepare_items(cfg: ClsConfig, ctx: DistContext) -> _Split:
    """Labels, crop cache (built on rank 0), items and the fold split."""
    layout = KaggleLayout(Path(cfg.data.root))
    labels = read_train_labels(layout.train_csv)
    uids = labels["StudyInstanceUID"].tolist()
    # Folds come from every study of train.csv, so a study whose crops fail never reshuffles the others.
    folds = fold_of(uids, cfg.n_folds, cfg.fold_seed)
    if ctx.is_main:
        build_crop_cache(
            layout, uids, cfg.data.mask_source, cfg.data.cache_dir, cfg.data.crop,
            pred_mask_dir=cfg.data.pred_mask_dir, split="train", num_workers=cfg.data.cache_workers,
        )
    barrier(ctx)
    # Every rank re-reads the finished cache (a no-op build) so all see the same list of usable studies.
    index = build_crop_cache(layout, uids, cfg.data.mask_source, cfg.data.cache_dir, cfg.data.crop,
                             pred_mask_dir=cfg.data.pred_mask_dir, split="train")
    ok = index[index["status"] != "failed"]
    if ok.empty:
        raise LayoutError("no study has crops; see the crop cache errors above", cfg.data.cache_dir)
    labels = labels[labels["StudyInstanceUID"].isin(ok["StudyInstanceUID"])].reset_index(drop=True)
    items = vertebra_items(labels, dict(zip(ok["StudyInstanceUID"], ok["path"])))
    val_uids = {u for u in labels["StudyInstanceUID"] if folds[u] == cfg.fold}
    train_uids = set(labels["StudyInstanceUID"]) - val_uids
    train_labels = labels[labels["StudyInstanceUID"].isin(train_uids)]
    in_train = items["StudyInstanceUID"].isin(train_uids)
    # Vertebrae the mask missed have no image: never trained on; in validation they take the prior.
    return _Split(
        train=items[in_train & items["present"]].reset_index(drop=True),
        val=items[~in_train & items["present"]].reset_index(drop=True),
        val_labels=labels[labels["StudyInstanceUID"].isin(val_uids)].reset_index(drop=True),
        prior=prior_predictions(train_labels),
    )


@torch.inference_mode()
def predict_batches(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    amp: bool,
    to_probs: Callable[[Any], torch.Tensor],
    num_workers: int = 0,
) -> np.ndarray:
    """Probabilities of every item of a dataset, in item order; the inference loop of both modes.

    Args:
        model: the classifier (put in eval mode here).
        dataset: items with an ``image`` (no augmentation).
        batch_size: items per forward pass.
        device: where the model is.
        amp: mixed precision on GPU.
        to_probs: one batch's model outputs → ``(B,)`` or ``(B, K)`` probabilities.
        num_workers: DataLoader workers.

    Returns:
        float64, one row per item (empty when the dataset is).
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs: list[np.ndarray] = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=None):
        with autocast(device, amp):
            out = model(*model_inputs(batch, device))
        probs.append(to_probs(out).float().cpu().numpy().astype(np.float64))
    return np.concatenate(probs) if probs else np.zeros(0)


def vertebra_probs(out: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """A :class:`FractureClassifier` batch output → fracture probabilities."""
    return torch.sigmoid(out["logit"].float())  # type: ignore[union-attr]


def study_predictions(items: pd.DataFrame, probs: np.ndarray, studies: list[str], prior: np.ndarray) -> np.ndarray:
    """``(n_studies, 8)`` predictions: item probabilities, the prior where a vertebra was not found, noisy-OR overall.

    Args:
        items: scored items (StudyInstanceUID, vertebra).
        probs: one probability per item row.
        studies: row order of the output.
        prior: ``(8,)`` fallback.
    """
    row_of = {uid: i for i, uid in enumerate(studies)}
    out = np.tile(prior[: len(VERTEBRAE)], (len(studies), 1)).astype(np.float64)
    rows = items["StudyInstanceUID"].map(row_of).to_numpy()
    out[rows, items["vertebra"].to_numpy()] = probs
    return np.column_stack([out, patient_overall(out, rule="noisy_or")])


def _validate(
    model: torch.nn.Module, dataset: VertebraDataset, split: _Split, cfg: ClsConfig, device: torch.device
) -> tuple[dict[str, float], np.ndarray, PatientCalibration]:
    """Validation metrics, the ``(n_val_studies, 8)`` predictions in ``split.val_labels`` order (noisy-OR
    patient_overall, what the OOF file and the CV report take) and the patient calibration fitted on them.

    ``val_score`` scores patient_overall as the pipeline will: through that calibration. It is fitted on
    these same studies (two parameters), but the fit is the checkpoint's own, and with plain noisy-OR the
    14-weight patient column's miscalibration moved the score more than the vertebra predictions did
    (cls_ev12 kept epoch 3 of 15). ``val_score_noisy_or`` is the plain-noisy-OR view.
    """
    probs = predict_batches(model, dataset, cfg.val_batch_size, device, cfg.amp, vertebra_probs, cfg.data.num_workers)
    labels = split.val["label"].to_numpy(np.float64)
    weights = np.where(labels > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    studies = split.val_labels["StudyInstanceUID"].tolist()
    y_true = split.val_labels[list(TARGET_COLUMNS)].to_numpy(np.float64)
    y_pred = study_predictions(split.val, probs, studies, split.prior)
    calibration = fit_patient_calibration(y_pred[:, : len(VERTEBRAE)], y_true[:, len(VERTEBRAE)])
    calibrated = y_pred.copy()
    calibrated[:, len(VERTEBRAE)] = patient_overall(y_pred[:, : len(VERTEBRAE)], rule="calibrated",
                                                    calibrations=[calibration])
    metrics = {
        "val_loss": weighted_log_loss(labels, probs, weights) if len(labels) else float("nan"),
        "val_auc": _auc(labels, probs),
        "val_score": score_arrays(y_true, calibrated),
        "val_score_noisy_or": score_arrays(y_true, y_pred),
        "prior_score": score_arrays(y_true, np.tile(split.prior, (len(studies), 1))),
    }
    return metrics, y_pred, calibration


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def write_oof(path: Path, studies: list[str], y_pred: np.ndarray, fold: int) -> Path:
    """Out-of-fold table: StudyInstanceUID, C1..C7, patient_overall, fold (what ``rsna-cspine cv`` reads).

    Args:
        path: destination CSV.
        studies: one UID per row of ``y_pred``.
        y_pred: ``(n, 8)`` in ``TARGET_COLUMNS`` order.
        fold: the validation fold.
    """
    frame = pd.DataFrame(y_pred, columns=list(TARGET_COLUMNS))
    frame.insert(0, "StudyInstanceUID", studies)
    frame["fold"] = fold
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


class VertebraTask:
    """Stage 2 as a :class:`TrainingTask`: vertebra stacks of one fold, scored with the competition metric.

    Args:
        cfg: the run config.
        split: the fold's items and labels.
        device: the training device.
    """

    monitor = "val_score"
    mode = "min"

    def __init__(self, cfg: ClsConfig, split: _Split, device: torch.device) -> None:
        self.cfg, self.split, self.device = cfg, split, device
        crop = cfg.data.crop
        augment = StackAugment(cfg.aug, crop.size, crop.in_chans - int(crop.add_mask_channel)) if cfg.aug.enabled else None
        weights = None
        if cfg.vertebra_sampling_weights:
            weights = np.asarray(cfg.vertebra_sampling_weights, dtype=np.float64)[split.train["vertebra"].to_numpy()]
        self.train_set = VertebraDataset(split.train, augment, seed=cfg.seed, in_memory=cfg.data.in_memory,
                                         sample_weights=weights, paste_prob=cfg.aug.paste_prob,
                                         paste_feather=cfg.aug.paste_feather)
        self.val_set = VertebraDataset(split.val, None, in_memory=cfg.data.in_memory)
        self.model = build_classifier(cfg).to(device)
        self.has_validation = cfg.fold >= 0 and len(split.val_labels) > 0
        self.oof_path = Path(cfg.run_dir) / f"oof_fold{cfg.fold}.csv"
        self._last_pred: np.ndarray | None = None
        self._calibration: PatientCalibration | None = None

    def loss(self, outputs: dict[str, torch.Tensor | None], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return vertebra_batch_loss(outputs, batch, self.cfg.slice_loss_weight, self.device, self.cfg.box_loss_weight)

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        # Fitted on the very predictions of the weights being saved, so best.pt carries its own fit.
        metrics, self._last_pred, self._calibration = _validate(model, self.val_set, self.split, self.cfg, self.device)
        return metrics

    def _write_oof(self, y_pred: np.ndarray) -> None:
        write_oof(self.oof_path, self.split.val_labels["StudyInstanceUID"].tolist(), y_pred, self.cfg.fold)

    def on_best(self) -> None:
        if self.has_validation and self._last_pred is not None:
            self._write_oof(self._last_pred)

    def finish(self, best_path: Path) -> None:
        if not (self.has_validation and best_path.is_file()):
            return
        # Re-score with best.pt so the OOF file always matches the checkpoint the CV and ensemble use.
        best_model = build_classifier(self.cfg, load_pretrained=False).to(self.device)
        load_checkpoint(best_path, model=best_model, map_location=self.device)
        metrics, y_pred, _ = _validate(best_model, self.val_set, self.split, self.cfg, self.device)
        self._write_oof(y_pred)
        log.info("best model: %s; out-of-fold predictions in %s", {k: round(v, 4) for k, v in metrics.items()}, self.oof_path)

    def checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"fold": self.cfg.fold}
        if self._calibration is not None:
            extra["patient_calibration"] = self._calibration.to_dict()
        return extra


def fold_run_dir(cfg: ClsConfig) -> Path:
    """``run_dir/fold{K}`` (``run_dir/all`` for fold -1): where one fold's checkpoints and summary live."""
    return Path(cfg.run_dir) / ("all" if cfg.fold < 0 else f"fold{cfg.fold}")


def train_classifier(cfg: ClsConfig, resume: bool = False) -> Path:
    """Train one fold; keep ``last.pt`` every epoch and ``best.pt`` on a better validation score.

    Args:
        cfg: the run config (``fold=-1`` trains on every study without validation).
        resume: continue from ``run_dir/fold{K}/last.pt`` (a fresh start when it does not exist yet).

    Returns:
        The fold's run folder; ``run_dir/oof_fold{K}.csv`` holds the best model's validation predictions.
    """
    cfg.validate()
    check_pretrained_file(cfg.model.backbone, cfg.model.pretrained_file)  # before any data work
    return run_seeded_distributed(lambda device, ctx: _train(cfg, resume, device, ctx),
                                  device=cfg.device, seed=cfg.seed, threads=cfg.threads)


def _train(cfg: ClsConfig, resume: bool, device: torch.device, ctx: DistContext) -> Path:
    started = time.monotonic()
    split = _prepare_items(cfg, ctx)
    run_dir = fold_run_dir(cfg)
    if ctx.is_main:
        prepare_run_dir(run_dir, cfg, resume)
    barrier(ctx)
    log.info(
        "fold %d: %d train items (%d positive), %d val studies; prior %s",
        cfg.fold, len(split.train), int(split.train["label"].sum()), len(split.val_labels), np.round(split.prior, 3),
    )
    return fit(VertebraTask(cfg, split, device), cfg, run_dir, resume, device, ctx, started=started)

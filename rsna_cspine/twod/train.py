"""Train a 2D image classifier (:class:`~rsna_cspine.twod.task.ImageTask` through the one training loop),
then write the val/test reports from ``best.pt``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rsna_cspine.engine.distributed import DistContext, barrier, run_seeded_distributed
from rsna_cspine.engine.runlog import prepare_run_dir
from rsna_cspine.training.loop import fit
from rsna_cspine.twod.config import TwoDConfig
from rsna_cspine.twod.data import check_images, index_images
from rsna_cspine.twod.masking import masker_from_state, masker_state
from rsna_cspine.twod.model import check_backbone_weights
from rsna_cspine.twod.report import negative_index, positive_index
from rsna_cspine.twod.split import SPLITS, split_indices
from rsna_cspine.twod.task import ImageTask

log = logging.getLogger(__name__)


def _write_splits(path: Path, frames: dict[str, pd.DataFrame], skipped: list[tuple[str, str]]) -> None:
    table = pd.concat([f[["path", "label", "study"]].assign(split=name) for name, f in frames.items()], ignore_index=True)
    if skipped:
        table = pd.concat([table, pd.DataFrame({"path": [p for p, _ in skipped], "label": "", "split": "skipped",
                                                "reason": [r for _, r in skipped]})], ignore_index=True)
    table.to_csv(path, index=False)


def train_2d(cfg: TwoDConfig, resume: bool = False) -> Path:
    """Train a 2D classifier on an image folder or CSV, then write val/test reports from ``best.pt``.

    Args:
        cfg: the run config (``cfg.data.root``: class folders or a ``path,label`` CSV).
        resume: continue from the run folder's ``last.pt`` (a fresh start when it does not exist yet).

    Returns:
        The run folder: ``last.pt``, ``best.pt``, ``summary.csv``, ``curves.png``, ``splits.csv``,
        ``config.yaml`` and ``report/``.
    """
    cfg.validate()
    check_backbone_weights(cfg.model.backbone, cfg.model.pretrained_file)  # before any data work
    if cfg.data.mask_with:
        masker_state(cfg.data.mask_with)  # a missing or wrong column U-Net stops the run before any data work
    return run_seeded_distributed(lambda device, ctx: _train(cfg, resume, device, ctx),
                                  device=cfg.device, seed=cfg.seed, threads=cfg.train.threads)


def _train(cfg: TwoDConfig, resume: bool, device: torch.device, ctx: DistContext) -> Path:
    started = time.monotonic()
    d = cfg.data
    extra, masker = {}, None
    if d.mask_with:
        extra["column_mask"] = masker_state(d.mask_with)
        masker = masker_from_state(extra["column_mask"], d.mask_mode, d.mask_margin)
    index, images = check_images(index_images(d.root, d.label_column, d.class_order), d.in_chans, d.image_size,
                                 d.dicom_window, skip_unreadable=d.skip_unreadable, keep=d.in_memory, transform=masker)
    splits = split_indices(index.frame["target"].to_numpy(), cfg.split, cfg.fold, cfg.train.n_folds, cfg.train.fold_seed,
                           groups=index.frame["study"].to_numpy())
    positive_index(index.classes, cfg.data.positive_class)  # refuse an unknown positive class before training
    negative_index(index.classes, cfg.data.negative_class)  # and an unknown negative class
    run_dir = prepare_run_dir(cfg.fold_dir(), cfg, resume, write=ctx.is_main)
    task = ImageTask(cfg, index, splits, images, device, run_dir, transform=masker, extra=extra)
    if ctx.is_main:
        _write_splits(run_dir / "splits.csv", task.frames, index.skipped)
    barrier(ctx)
    counts = {s: np.bincount(task.frames[s]["target"], minlength=len(index.classes)).tolist() for s in SPLITS}
    log.info("classes %s; images per class and split %s", index.classes, counts)
    return fit(task, cfg, run_dir, device=device, ctx=ctx, resume=resume, started=started)

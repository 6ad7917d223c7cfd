"""Train the stage-2 fracture classifier on one fold (:class:`~rsna_cspine.cls.task.VertebraTask` through the
one training loop) and write its out-of-fold predictions.

Data order depends only on (seed, epoch) and each item's augmentation only on (seed, epoch, item), so a
run resumed from ``last.pt`` repeats the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.data import vertebra_items
from rsna_cspine.cls.model import check_pretrained_file
from rsna_cspine.cls.task import FoldSplit, VertebraTask
from rsna_cspine.engine.distributed import DistContext, barrier, run_seeded_distributed, under_torchrun
from rsna_cspine.engine.folds import fold_of
from rsna_cspine.engine.runlog import prepare_run_dir
from rsna_cspine.errors import LayoutError
from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
from rsna_cspine.metric import prior_predictions
from rsna_cspine.training.caches import require_crop_cache
from rsna_cspine.training.loop import fit

log = logging.getLogger(__name__)

#: What builds the crop cache of a config in one process (named when torchrun finds it incomplete).
PREPARE_COMMAND = "rsna-cspine train-cls --config CONFIG --prepare-only"


def _labels(cfg: ClsConfig) -> tuple[KaggleLayout, pd.DataFrame]:
    layout = KaggleLayout(Path(cfg.data.root))
    return layout, read_train_labels(layout.train_csv)


def prepare_classifier_data(cfg: ClsConfig) -> pd.DataFrame:
    """Build (or complete) the crop cache of every study in train.csv; the index of ``build_crop_cache``.

    Args:
        cfg: the run config (``data`` section).
    """
    from rsna_cspine.crops.cache import build_crop_cache

    cfg.validate()
    layout, labels = _labels(cfg)
    d = cfg.data
    return build_crop_cache(layout, labels["StudyInstanceUID"].tolist(), d.mask_source, d.cache_dir, d.crop,
                            pred_mask_dir=d.pred_mask_dir, split="train", num_workers=d.cache_workers)


def fold_split(cfg: ClsConfig, index: pd.DataFrame) -> FoldSplit:
    """The fold's items from a crop cache index (studies whose crops failed are left out).

    Args:
        cfg: the run config (``fold``, ``train.n_folds``, ``train.fold_seed``).
        index: ``build_crop_cache``'s index of the train.csv studies.
    """
    _, labels = _labels(cfg)
    # Folds come from every study of train.csv, so a study whose crops fail never reshuffles the others.
    # Fold -1 validates on nothing, so it needs no fold assignment (and works with fewer studies than folds).
    folds = fold_of(labels["StudyInstanceUID"].tolist(), cfg.train.n_folds, cfg.train.fold_seed) if cfg.fold >= 0 else {}
    ok = index[index["status"] != "failed"]
    if ok.empty:
        raise LayoutError("no study has crops; see the crop cache errors above", cfg.data.cache_dir)
    labels = labels[labels["StudyInstanceUID"].isin(ok["StudyInstanceUID"])].reset_index(drop=True)
    items = vertebra_items(labels, dict(zip(ok["StudyInstanceUID"], ok["path"])))
    val_uids = {u for u in labels["StudyInstanceUID"] if folds.get(u) == cfg.fold}
    train_uids = set(labels["StudyInstanceUID"]) - val_uids
    in_train = items["StudyInstanceUID"].isin(train_uids)
    # Vertebrae the mask missed have no image: never trained on; in validation they take the prior.
    return FoldSplit(
        train=items[in_train & items["present"]].reset_index(drop=True),
        val=items[~in_train & items["present"]].reset_index(drop=True),
        val_labels=labels[labels["StudyInstanceUID"].isin(val_uids)].reset_index(drop=True),
        prior=prior_predictions(labels[labels["StudyInstanceUID"].isin(train_uids)]),
    )


def train_classifier(cfg: ClsConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one fold; keep ``last.pt`` every epoch and ``best.pt`` on a better validation score.

    A plain run builds the crop cache first (one process, ``data.cache_workers`` helpers); under torchrun
    the cache must be complete already (:data:`PREPARE_COMMAND`), so no rank waits while another decodes.

    Args:
        cfg: the run config (``fold=-1`` trains on every study without validation).
        resume: continue from ``run_dir/fold{K}/last.pt`` (a fresh start when it does not exist yet).
        progress: tqdm bars.

    Returns:
        The fold's run folder; ``run_dir/oof_fold{K}.csv`` holds the best model's validation predictions.
    """
    started = time.monotonic()
    cfg.validate()
    check_pretrained_file(cfg.model.backbone, cfg.model.pretrained_file)  # before any data work
    if under_torchrun():
        _, labels = _labels(cfg)
        index = require_crop_cache(cfg.data.cache_dir, labels["StudyInstanceUID"].tolist(), cfg.data.crop,
                                   PREPARE_COMMAND)
    else:
        index = prepare_classifier_data(cfg)
    split = fold_split(cfg, index)
    return run_seeded_distributed(lambda device, ctx: _train(cfg, split, resume, device, ctx, started, progress),
                                  device=cfg.device, seed=cfg.seed, threads=cfg.train.threads)


def _train(cfg: ClsConfig, split: FoldSplit, resume: bool, device: torch.device, ctx: DistContext, started: float,
           progress: bool) -> Path:
    run_dir = prepare_run_dir(cfg.fold_dir(), cfg, resume, write=ctx.is_main)
    barrier(ctx)
    log.info(
        "fold %d: %d train items (%d positive), %d val studies; prior %s",
        cfg.fold, len(split.train), int(split.train["label"].sum()), len(split.val_labels), np.round(split.prior, 3),
    )
    return fit(VertebraTask(cfg, split, device), cfg, run_dir, device=device, ctx=ctx, resume=resume, started=started,
               progress=progress)

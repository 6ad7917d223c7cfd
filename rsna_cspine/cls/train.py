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
from rsna_cspine.engine.distributed import DistContext, barrier, run_seeded_distributed
from rsna_cspine.engine.folds import fold_of
from rsna_cspine.engine.runlog import prepare_run_dir
from rsna_cspine.errors import LayoutError
from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
from rsna_cspine.metric import prior_predictions
from rsna_cspine.training.caches import prepared_crop_index
from rsna_cspine.training.loop import fit

log = logging.getLogger(__name__)


def prepare_command(cfg: ClsConfig) -> str:
    """The command that prepares the cache this config trains from (named when it is missing or incomplete).

    Args:
        cfg: the run config.
    """
    return (f"rsna-cspine prepare --data {cfg.data.root} --out {cfg.data.cache_dir} --cls-config CONFIG "
            "[--seg-config SEG_CONFIG] [--seg-models MODELS]")


def _labels(cfg: ClsConfig) -> tuple[KaggleLayout, pd.DataFrame]:
    layout = KaggleLayout(Path(cfg.data.root))
    return layout, read_train_labels(layout.train_csv)


def classifier_data(cfg: ClsConfig) -> pd.DataFrame:
    """The crop index of every train.csv study from the prepared cache (``data.cache_dir``, written by
    ``rsna-cspine prepare``); nothing is decoded. Studies without crops are rows with status ``failed``;
    those in ``data.exclude`` are left out.

    Args:
        cfg: the run config (``data`` section).

    Raises:
        LayoutError: no prepared cache, or a study it has neither prepared nor failed.
        ConfigError: the cache was prepared with another crop geometry than ``data.crop``.
    """
    cfg.validate()
    _, labels = _labels(cfg)
    d = cfg.data
    return prepared_crop_index(d.cache_dir, labels["StudyInstanceUID"].tolist(), d.crop, prepare_command(cfg),
                               exclude=d.exclude)


def validation_studies(cfg: ClsConfig) -> list[str]:
    """The train.csv studies of the run's validation fold, in table order (what ``data.val_cache_dir`` must hold).

    Args:
        cfg: the run config (``data.root``, ``fold``, ``train.n_folds``, ``train.fold_seed``).
    """
    excluded = set(cfg.data.exclude)
    return [u for u in _fold_studies(cfg, _labels(cfg)[1]) if u not in excluded]


def _fold_studies(cfg: ClsConfig, labels: pd.DataFrame) -> list[str]:
    """The studies of ``labels`` in the run's validation fold, in table order. Folds come from every study of
    train.csv, so a study whose crops fail never reshuffles the others; fold -1 validates on nothing (and
    works with fewer studies than folds)."""
    uids = labels["StudyInstanceUID"].tolist()
    folds = fold_of(uids, cfg.train.n_folds, cfg.train.fold_seed) if cfg.fold >= 0 else {}
    return [u for u in uids if folds.get(u) == cfg.fold]


def _with_validation_crops(cfg: ClsConfig, index: pd.DataFrame, val_uids: list[str]) -> pd.DataFrame:
    """``index`` with the validation studies' rows taken from ``data.val_cache_dir``."""
    command = (f"rsna-cspine prepare --data {cfg.data.root} --out {cfg.data.val_cache_dir} --cls-config CONFIG "
               "--seg-models MODELS --studies VALIDATION_UIDS")
    val_index = prepared_crop_index(cfg.data.val_cache_dir, val_uids, cfg.data.crop, command, exclude=cfg.data.exclude)
    sources = val_index.loc[val_index["status"] != "failed", "mask_source"].value_counts().to_dict()
    log.info("fold %d: the %d validation studies' crops come from %s (mask sources %s)", cfg.fold, len(val_index),
             cfg.data.val_cache_dir, sources)
    return pd.concat([index[~index["StudyInstanceUID"].isin(set(val_uids))], val_index], ignore_index=True)


def fold_split(cfg: ClsConfig, index: pd.DataFrame) -> FoldSplit:
    """The fold's items from a crop cache index (studies whose crops failed are left out); with
    ``data.val_cache_dir``, the validation studies' crops come from that cache.

    Args:
        cfg: the run config (``fold``, ``train.n_folds``, ``train.fold_seed``).
        index: :func:`classifier_data`'s index of the train.csv studies.
    """
    _, labels = _labels(cfg)
    fold_uids = _fold_studies(cfg, labels)
    if cfg.data.val_cache_dir and fold_uids:
        index = _with_validation_crops(cfg, index, fold_uids)  # data.exclude is left out there
    ok = index[index["status"] != "failed"]
    if ok.empty:
        raise LayoutError("no study has crops; see the crop cache errors above", cfg.data.cache_dir)
    labels = labels[labels["StudyInstanceUID"].isin(ok["StudyInstanceUID"])].reset_index(drop=True)
    items = vertebra_items(labels, dict(zip(ok["StudyInstanceUID"], ok["path"])))
    val_uids = set(fold_uids) & set(labels["StudyInstanceUID"])
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

    The crops come from the prepared cache (:func:`classifier_data`): nothing is decoded here, so under
    torchrun no rank waits while another decodes.

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
    split = fold_split(cfg, classifier_data(cfg))
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

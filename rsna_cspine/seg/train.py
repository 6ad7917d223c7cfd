"""Train the stage-1 vertebra segmenter on one fold: cache → :class:`~rsna_cspine.seg.task.SegmentationTask`
through the one training loop → ``best.pt`` by validation Dice."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsna_cspine.engine.devices import resolve_device, seed_everything, torch_threads
from rsna_cspine.engine.distributed import DistContext, barrier, run_seeded_distributed
from rsna_cspine.engine.folds import fold_of
from rsna_cspine.engine.runlog import prepare_run_dir
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.seg.boxes import CascadeGeometry
from rsna_cspine.seg.config import SegConfig, SegDataConfig
from rsna_cspine.seg.localise import CHECKPOINT_KEY, localiser_checkpoint_entry, localiser_config
from rsna_cspine.seg.model import grid_divisor
from rsna_cspine.seg.preprocess import THORACIC_MODES
from rsna_cspine.seg.task import SegmentationTask
from rsna_cspine.training.caches import prepared_seg_studies
from rsna_cspine.training.loop import fit

log = logging.getLogger(__name__)


def prepare_command(cfg: SegConfig, root: str | None = None, cache: str | Path | None = None) -> str:
    """The command that prepares a cache this config trains from (named when it is missing or incomplete).

    Args:
        cfg: the run config.
        root: the studies' folder (default ``data.root``; an entry of ``data.extra`` for its cache).
        cache: its prepared cache (default ``data.cache_dir``).
    """
    root = cfg.data.root if root is None else root
    cache = cfg.data.cache_dir if cache is None else cache
    return (f"rsna-cspine prepare --data {root} --out {cache} --seg-config CONFIG "
            "[--cls-config CLS_CONFIG | --segmented-only]")


def resolve_config(cfg: SegConfig) -> SegConfig:
    """Check settings that would otherwise fail deep inside training; returns the config unchanged.

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
    d, loc = cfg.data, cfg.localiser
    if d.cascade != loc.enabled:
        raise ConfigError("the cascade needs both data.spacing (mm per fine-grid voxel) and localiser.enabled: true; "
                          f"got data.spacing={list(d.spacing)}, localiser.enabled={loc.enabled}")
    if d.cascade:
        if len(d.spacing) != 3 or min(d.spacing) <= 0 or min(loc.spacing) <= 0 or min(d.box_margin_mm) < 0:
            raise ConfigError(f"data.spacing and localiser.spacing need 3 positive values and data.box_margin_mm "
                              f"3 values ≥ 0; got {list(d.spacing)}, {list(loc.spacing)}, {list(d.box_margin_mm)}")
        if any(int(g) % grid_divisor(loc.model) for g in loc.grid):
            raise ConfigError(f"localiser.grid {tuple(loc.grid)} must be divisible by {grid_divisor(loc.model)}")
        if not 0.0 < loc.time_share < 1.0 or loc.epochs < 1:
            raise ConfigError(f"localiser.time_share must be in (0, 1) and localiser.epochs ≥ 1; got "
                              f"{loc.time_share}, {loc.epochs}")
    cfg.train.validate()
    cfg.check_run(cfg.train.n_folds)
    return cfg


def cascade_geometry(cfg: SegConfig) -> CascadeGeometry | None:
    """The cascade's spacings and margins of a config (what its cache files depend on); None without it.

    Args:
        cfg: the run config.
    """
    d = cfg.data
    if not d.cascade:
        return None
    return CascadeGeometry(tuple(d.spacing), tuple(d.box_margin_mm), tuple(cfg.localiser.spacing),  # type: ignore[arg-type]
                           float(d.reference_neck_mm))


def labelled_studies(root: str | Path, max_studies: int = 0) -> list[str]:
    """Training studies (train.csv) that have a segmentation, sorted; the first ``max_studies`` if > 0.

    Studies with unknown fracture labels (imported for stage 1) count: only their segmentation is used.

    Args:
        root: Kaggle-layout folder.
        max_studies: cap on the number of studies (0 = no cap).
    """
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels

    layout = KaggleLayout(root)
    labels = read_train_labels(layout.train_csv, keep_unknown=True)
    uids = sorted(u for u in labels["StudyInstanceUID"].astype(str).unique() if layout.segmentation_path(u))
    if not uids:
        raise LayoutError("no training study has a segmentation", layout.segmentations)
    return uids[:max_studies] if max_studies > 0 else uids


def study_sources(d: SegDataConfig) -> dict[str, tuple[str, Path]]:
    """Every segmented study of ``data.root`` and ``data.extra``: uid → (its RSNA-layout folder, its cache folder).

    ``data.root``'s studies are prepared into ``data.cache_dir``, those of ``data.extra[i]`` into
    ``cache_dir/extra{i}`` (``rsna-cspine prepare --data EXTRA --out CACHE/extra{i}``). Studies in
    ``data.exclude`` are left out; ``max_studies`` caps the rest (sorted by uid).

    Args:
        d: the data section.

    Raises:
        ConfigError: one study in two folders.
    """
    sources: dict[str, tuple[str, Path]] = {}
    roots = [(d.root, Path(d.cache_dir))] + [(r, Path(d.cache_dir) / f"extra{i}") for i, r in enumerate(d.extra)]
    excluded = set(d.exclude)
    for root, cache in roots:
        for uid in labelled_studies(root):
            if uid in excluded:
                continue
            if uid in sources:
                raise ConfigError(f"study {uid} is in both {sources[uid][0]} and {root}")
            sources[uid] = (root, cache)
    if d.extra:
        log.info("stage-1 studies: %s", {root: sum(s[0] == root for s in sources.values()) for root, _ in roots})
    chosen = sorted(sources)[: d.max_studies] if d.max_studies > 0 else sorted(sources)
    return {uid: sources[uid] for uid in chosen}


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


def segmentation_data(cfg: SegConfig) -> dict[str, Path]:
    """uid → stage-1 cache file of every segmented training study the prepared cache holds (``data.cache_dir``,
    written by ``rsna-cspine prepare``); nothing is decoded. Studies whose preparation failed and those in
    ``data.exclude`` are left out.

    Args:
        cfg: the run config (``data`` section).

    Raises:
        LayoutError: no prepared cache, or a segmented study it has neither prepared nor failed.
        ConfigError: the cache was prepared with another grid, HU window, antialias or cascade setting.
    """
    d = resolve_config(cfg).data
    sources = study_sources(d)
    cascade = cascade_geometry(cfg)
    cached: dict[str, Path] = {}
    for root, cache in dict.fromkeys(sources.values()):
        uids = [u for u, source in sources.items() if source == (root, cache)]
        cached |= prepared_seg_studies(cache, uids, d.grid, d.hu_window, d.antialias, prepare_command(cfg, root, cache),
                                       cascade=None if cascade is None else cascade.settings())
    return cached


def train_segmentation(cfg: SegConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one fold of the stage-1 segmenter and return its run folder (``run_dir/fold{K}``).

    Writes ``config.yaml`` (resolved), ``summary.csv``/``curves.png`` per epoch (losses, val Dice mean and
    per vertebra, lr, time), ``last.pt`` every epoch and ``best.pt`` on the best validation mean Dice.
    The studies come from the prepared cache (:func:`segmentation_data`): nothing is decoded here.
    With the cascade the localiser trains first, in ``run_dir/fold{K}/localiser`` (same files), and
    the vertebra network's checkpoints carry it.

    Args:
        cfg: the run config.
        resume: continue from the fold's ``last.pt`` (weights, optimiser, scheduler, scaler, RNG, budget).
        progress: tqdm bars.
    """
    started = time.monotonic()
    cfg = resolve_config(cfg)
    d = cfg.data
    cached = segmentation_data(cfg)
    usable = sorted(cached)
    if not usable:
        raise LayoutError("the prepared cache holds no usable segmented study (see its manifest.csv)", d.cache_dir)
    train_uids, val_uids = split_studies(usable, cfg.fold, cfg.train.n_folds, cfg.train.fold_seed)
    if not train_uids:
        raise LayoutError(f"fold {cfg.fold} leaves no training study", d.root)
    log.info("seg fold %d: %d train / %d val studies", cfg.fold, len(train_uids), len(val_uids))
    return run_seeded_distributed(
        lambda device, ctx: fit_segmentation(
            cfg, [cached[u] for u in train_uids], [cached[u] for u in val_uids], resume=resume, progress=progress,
            ctx=ctx, device=device, started=started, extra={"train_uids": train_uids, "val_uids": val_uids},
        ),
        device=cfg.device, seed=cfg.seed, threads=cfg.train.threads,
    )


def fit_segmentation(
    cfg: SegConfig,
    train_paths: Sequence[Path],
    val_paths: Sequence[Path],
    *,
    resume: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
    device: Any | None = None,
    extra: dict[str, Any] | None = None,
    started: float | None = None,
) -> Path:
    """Train on already cached studies (``train_segmentation`` without the data set-up).

    With the cascade the localiser trains first, for ``localiser.time_share`` of the budget left after
    data preparation; a run resumed after the vertebra network started keeps the localiser it has.

    Args:
        cfg: the run config.
        train_paths: cache files to train on.
        val_paths: cache files to validate on (empty: keep the latest weights as best).
        resume: continue from the fold's ``last.pt``.
        progress: tqdm bars.
        ctx: torchrun context (plain single process when None).
        device: where to train (from ``cfg.device`` when None).
        extra: stored in every checkpoint (e.g. the study split).
        started: ``time.monotonic()`` the time budget counts from (default now).
    """
    cfg = resolve_config(cfg)
    device = device or resolve_device(cfg.device)
    ctx = ctx or DistContext()
    started = time.monotonic() if started is None else started
    with torch_threads(cfg.train.threads):
        seed_everything(cfg.seed)
        run_dir = prepare_run_dir(cfg.fold_dir(), cfg, resume, write=ctx.is_main)
        barrier(ctx)
        extra = dict(extra or {})
        if cfg.data.cascade:
            extra[CHECKPOINT_KEY] = _fit_localiser(cfg, run_dir, train_paths, val_paths, resume=resume,
                                                   progress=progress, ctx=ctx, device=device, started=started)
            seed_everything(cfg.seed)
        source = "fine" if cfg.data.cascade else "grid"
        task = SegmentationTask(cfg, train_paths, val_paths, device, extra=extra, progress=progress and ctx.is_main,
                                source=source)
        return fit(task, cfg, run_dir, device=device, ctx=ctx, resume=resume, started=started, progress=progress)


def _fit_localiser(
    cfg: SegConfig, fold_dir: Path, train_paths: Sequence[Path], val_paths: Sequence[Path], *, resume: bool,
    progress: bool, ctx: DistContext, device: Any, started: float,
) -> dict[str, Any]:
    """Train (or, resuming after the vertebra network started, reload) the cascade's localiser; its checkpoint entry."""
    from rsna_cspine.engine import load_checkpoint

    loc_cfg = localiser_config(cfg)
    loc_dir = fold_dir / "localiser"
    finished = resume and (fold_dir / "last.pt").is_file() and (loc_dir / "best.pt").is_file()
    task = SegmentationTask(loc_cfg, train_paths, val_paths, device, progress=progress and ctx.is_main,
                            source="localiser")
    if not finished:
        if cfg.train.max_minutes > 0:
            # Its share of what data preparation left; the budget counts from the command's start.
            spent_min = (time.monotonic() - started) / 60.0
            left = max(cfg.train.max_minutes - spent_min, 0.0)
            loc_cfg.train.max_minutes = spent_min + cfg.localiser.time_share * left
        prepare_run_dir(loc_dir, loc_cfg, resume, write=ctx.is_main)
        barrier(ctx)
        log.info("localiser: %d train / %d val studies, coarse grid %s at %s mm", len(train_paths), len(val_paths),
                 tuple(loc_cfg.data.grid), tuple(loc_cfg.data.spacing))
        fit(task, loc_cfg, loc_dir, device=device, ctx=ctx, resume=resume, started=started, progress=progress)
        barrier(ctx)
    load_checkpoint(loc_dir / "best.pt", model=task.model, map_location=device)
    return localiser_checkpoint_entry(loc_cfg, task.model)

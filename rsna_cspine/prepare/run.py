"""``prepare`` over many studies: the shard's studies, in parallel within a CPU budget, resumable.

Studies go through the project's :class:`~rsna_cspine.runner.StudyRunner` with the cache's ledger
(``CACHE/finished/``): a study is prepared once per settings and inputs; a killed run resumes where it
stopped; shards (``shard=(i, n)``) may fill one cache folder at once; a failing study is listed with its
reason (``finished/failed/``, ``manifest.csv``) and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from rsna_cspine.errors import ConfigError
from rsna_cspine.training.prepared import MANIFEST_FILE, PreparedCache
from rsna_cspine.prepare.config import PrepareConfig, resolve_seg_models, settings_fingerprint
from rsna_cspine.prepare.study import StudyJob, prepare_study, study_inputs, study_size
from rsna_cspine.runner import StudyRunner

log = logging.getLogger(__name__)


@dataclass
class PrepareSummary:
    """What one ``prepare`` run did.

    Attributes:
        cache: the cache folder.
        selected: studies of this shard.
        done: prepared now.
        resumed: prepared by an earlier run (left alone).
        failed: uid → reason.
        bytes_written: size of the files written now.
        seconds: wall time of the run.
        workers: studies prepared at once.
        threads: threads (decoder processes, torch threads) per study.
        manifest: ``manifest.csv`` after the run (every shard's studies).
    """

    cache: Path
    selected: int
    done: int
    resumed: int
    failed: dict[str, str]
    bytes_written: int
    seconds: float
    workers: int
    threads: int
    manifest: pd.DataFrame

    def line(self) -> str:
        """One line for the console."""
        rate = self.done / self.seconds * 3600 if self.seconds > 0 and self.done else 0.0
        return (f"prepared {self.done} studies ({rate:.0f}/h with {self.workers} worker(s) × {self.threads} "
                f"thread(s)), {self.resumed} already prepared, {len(self.failed)} failed; "
                f"{self.bytes_written / 1e9:.2f} GB written to {self.cache} (see {MANIFEST_FILE})")


@contextlib.contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """This process's torch threads, and its BLAS and OpenMP pools (numpy's and scipy's OpenBLAS start one
    thread per core), for the duration: studies prepared here, not in workers."""
    from threadpoolctl import threadpool_limits

    from rsna_cspine.engine.devices import torch_threads

    with torch_threads(threads), threadpool_limits(limits=threads):
        yield


def largest_first(uids: Sequence[str], size: Callable[[str], tuple[int, int]]) -> list[str]:
    """The studies in the order they are best started: the largest first (ties keep their order).

    With studies of very unequal size (200 to 1,000 slices) over a few workers, a large study started
    last runs alone while the other workers idle; started first, it overlaps the small ones, whose
    short tail evens out the end (longest-processing-time-first scheduling). Only the order of work
    changes: shards, the ledger and every file are the same whatever the order.

    Args:
        uids: the studies to prepare.
        size: a study's work, known before decoding it (:func:`study.study_size`: slices, bytes).
    """
    return sorted(uids, key=size, reverse=True)  # sorted() is stable with reverse=True too


def select_studies(root: str | Path, split: str, studies: Sequence[str] | None, segmented_only: bool) -> list[str]:
    """The studies to prepare, in table order: ``studies`` if given, else train.csv or test.csv.

    Args:
        root: the Kaggle-layout folder.
        split: ``train`` or ``test``.
        studies: explicit StudyInstanceUIDs (kept in this order; an empty list selects none), or None.
        segmented_only: keep only studies with a segmentation.
    """
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.seg.batch import study_uids

    uids = list(dict.fromkeys(studies)) if studies is not None else study_uids(root, split)
    if segmented_only:
        layout = KaggleLayout(Path(root))
        uids = [u for u in uids if layout.segmentation_path(u) is not None]
    return uids


def prepare_dataset(
    root: str | Path,
    out: str | Path,
    cfg: PrepareConfig | None = None,
    *,
    seg_models: str | Path | None = None,
    split: str = "train",
    shard: tuple[int, int] | None = None,
    studies: Sequence[str] | None = None,
    restart: bool = False,
    progress: bool = True,
    stage1_studies: Sequence[str] | None = None,
) -> PrepareSummary:
    """Prepare every study of a split (or of one shard of it) into one cache folder.

    Args:
        root: the Kaggle-layout folder (train.csv / test.csv, *_images/, segmentations/, bounding boxes).
        out: the cache folder (created; shards of one job may share it).
        cfg: the settings (defaults when None).
        seg_models: stage-1 models for the masks (checkpoint, models folder or runs folder); None: true
            masks only (studies without a segmentation get the stage-1 input but no crops).
        split: ``train`` or ``test``.
        shard: ``(i, n)`` prepares studies ``k`` with ``k % n == i`` of the list (they are then started
            largest first, see :func:`largest_first`).
        studies: only these StudyInstanceUIDs (default: every study of the split's table).
        restart: forget what the folder holds (even under other settings) and prepare everything again.
        progress: tqdm bar (studies/s, ETA).
        stage1_studies: only these studies get the stage-1 input (default: every study); the others get their
            mask and crops. For a run whose stage 1 trains on a few of many studies (the demo's 60 of 264): the
            input is about two fifths of a study's preparation (evidence.md, "The demo on a slower CPU").

    Raises:
        ConfigError: the folder was prepared with other settings (without ``restart``), or bad settings.
    """
    from rsna_cspine.crops.cache import boxes_by_study
    from rsna_cspine.io.kaggle import KaggleLayout

    started = time.monotonic()
    cfg = cfg or PrepareConfig()
    cfg.validate()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = PreparedCache(out)
    models = resolve_seg_models(seg_models)
    if cfg.mask_source == "pred" and not models:
        raise ConfigError("mask_source='pred' needs stage-1 models (--seg-models)")
    layout = KaggleLayout(Path(root))
    workers, threads = cfg.cpu_plan()
    job = StudyJob(root=str(layout.root), split=split, out=str(cache.root), cfg=cfg,
                   seg_models=tuple(str(p.resolve()) for p in models), boxes=boxes_by_study(layout, split),
                   decode_workers=threads, stage1_studies=None if stage1_studies is None else frozenset(stage1_studies))
    fingerprint = settings_fingerprint(cfg, models, split)
    ledger = cache.ledger(fingerprint, resume=not restart, on_change="restart" if restart else "refuse",
                          inputs=partial(study_inputs, job))
    cache.write_settings(fingerprint)
    runner = StudyRunner(ledger, shard=shard, workers=0 if workers == 1 else workers, worker_threads=threads,
                         desc="prepare", progress=progress)
    plan = runner.plan(select_studies(root, split, studies, cfg.segmented_only))
    plan.todo = largest_first(plan.todo, partial(study_size, job))  # the shard is chosen first, in table order
    log.info("prepare: %d studies at once, %d thread(s) each, largest first", workers, threads)
    with _cpu_threads(threads) if workers == 1 else contextlib.nullcontext():
        report = runner.run(plan, partial(prepare_study, job=job))
    written = sum(int(o.record.get("bytes", 0)) for o in report.outcomes if o.status == "done" and o.record)
    summary = PrepareSummary(cache.root, len(plan.selected), report.count("done"), report.count("resumed"),
                             report.failures, written, time.monotonic() - started, workers, threads, pd.DataFrame())
    cache.write_manifest()
    summary.manifest = cache.manifest()
    log.info("%s", summary.line())
    return summary

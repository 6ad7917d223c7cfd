"""How the trainers find their data: a prepared cache (``rsna-cspine prepare``), read without decoding.

Both trainers only read: stage 1 the grid volumes and labels of the segmented studies, stage 2 the
crops. A cache prepared with other stage-1 input or crop settings than the training config is refused
with the settings that differ; a study the cache has neither prepared nor listed as failed stops the run
with the command that prepares it (whether under torchrun or not: every rank checks, none waits while
another decodes); studies that failed, have no crops or are in ``data.exclude`` are left out, logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rsna_cspine.config import to_dict
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.training.prepared import PreparedCache

log = logging.getLogger(__name__)

#: The cascade's stage-1 input settings (empty lists without it), as a prepared cache records them.
CASCADE_KEYS: tuple[str, ...] = ("spacing", "box_margin_mm", "localiser_spacing")
#: Columns of the crop index the stage-2 trainer reads (one row per study).
INDEX_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "path", "status", "mask_source", "n_present", "has_boxes", "error")


def _open(cache_dir: str | Path, command: str) -> tuple[PreparedCache, dict[str, Any]]:
    cache = PreparedCache(cache_dir)
    settings = cache.settings()
    if settings is None:
        raise LayoutError(f"no prepared cache here: prepare it first with `{command}`", cache.root)
    return cache, settings


def _compare(cache: PreparedCache, stored: dict[str, Any], wanted: dict[str, Any], section: str, key: str,
             command: str) -> None:
    """Refuse a cache whose ``section`` settings differ from the training config's ``key``."""
    differ = [f"{name}: cache {stored.get(name)!r}, config {value!r}" for name, value in wanted.items()
              if stored.get(name) != value]
    if differ:
        raise ConfigError(
            f"was prepared with other {section} settings than this config's {key} ({'; '.join(differ)}). "
            f"Prepare a cache with the config's settings (`{command}`) or set data.cache_dir to one that has them",
            cache.root,
        )


def _refuse_missing(cache: PreparedCache, missing: list[str], total: int, command: str) -> None:
    if missing:
        raise LayoutError(
            f"prepared cache is incomplete ({len(missing)} of {total} studies neither prepared nor failed, e.g. "
            f"{missing[:3]}): the trainers never decode DICOM; prepare them first with `{command}`",
            cache.root,
        )


def _without_excluded(uids: Sequence[str], exclude: Sequence[str]) -> list[str]:
    excluded = set(exclude)
    dropped = [u for u in uids if u in excluded]
    if dropped:
        log.info("data.exclude: %d studies never used for training: %s", len(dropped), dropped)
    return [u for u in dict.fromkeys(uids) if u not in excluded]


def prepared_seg_studies(
    cache_dir: str | Path, uids: Sequence[str], grid: Sequence[int], hu_window: Sequence[float], antialias: bool,
    command: str, exclude: Sequence[str] = (), cascade: dict[str, list[float]] | None = None,
) -> dict[str, Path]:
    """uid → stage-1 cache file (grid volume + labels; with the cascade its fine box and coarse input) of
    every study of ``uids`` the cache prepared.

    Args:
        cache_dir: the prepared cache.
        uids: the segmented studies the run needs.
        grid: the run's ``data.grid``.
        hu_window: the run's ``data.hu_window``.
        antialias: the run's ``data.antialias``.
        command: the command that prepares the cache, for the error messages.
        exclude: studies never used for training.
        cascade: the run's cascade settings (``seg.boxes.CascadeGeometry.settings()``: ``spacing``,
            ``box_margin_mm``, ``localiser_spacing``, ``reference_neck_mm`` when set); None without the cascade.

    Raises:
        LayoutError: no cache, or a study neither prepared nor failed.
        ConfigError: the cache was prepared with another grid, HU window, antialias or cascade setting.
    """
    cache, settings = _open(cache_dir, command)
    wanted = {"grid": [int(g) for g in grid], "hu_window": [float(h) for h in hu_window], "antialias": bool(antialias),
              **{key: [float(v) for v in (cascade or {}).get(key, [])] for key in CASCADE_KEYS}}
    # Recorded only when on (see prepare.config.stage1_settings): None on both sides when off.
    reference = (cascade or {}).get("reference_neck_mm")
    wanted["reference_neck_mm"] = float(reference[0]) if reference else None
    _compare(cache, settings.get("stage1", {}), wanted, "stage-1 input",
             "data.grid/hu_window/antialias/spacing/box_margin_mm/reference_neck_mm, localiser.spacing", command)
    uids = _without_excluded(uids, exclude)
    records = cache.records()
    failures = cache.failures(records)
    done = {u: cache.resolve(records[u]["seg_file"]) for u in uids
            if u in records and records[u].get("has_labels") and records[u].get("seg_file")}
    skipped = {u: failures[u].get("reason", "") for u in uids if u not in done and u in failures}
    for uid, reason in skipped.items():
        log.warning("stage 1: study %s left out: preparing it failed: %s", uid, reason)
    without = [u for u in uids if u in records and records[u].get("has_labels") and not records[u].get("seg_file")]
    if without:  # prepared for stage 2 only (prepare_dataset's stage1_studies)
        raise LayoutError(f"{len(without)} of the {len(uids)} studies stage 1 needs were prepared without their "
                          f"stage-1 input (e.g. {without[0]}); prepare them again with it: {command}", cache.root)
    _refuse_missing(cache, [u for u in uids if u not in done and u not in skipped], len(uids), command)
    return done


def prepared_crop_index(
    cache_dir: str | Path, uids: Sequence[str], crop_cfg: object, command: str, exclude: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per study of ``uids`` (``exclude`` left out): its crop file, or ``failed`` with the reason.

    Args:
        cache_dir: the prepared cache.
        uids: the studies the run needs (train.csv).
        crop_cfg: the run's ``data.crop`` (the cache must have been prepared with it).
        command: the command that prepares the cache, for the error messages.
        exclude: studies never used for training.

    Returns:
        Columns :data:`INDEX_COLUMNS`; status ``cached`` or ``failed``.

    Raises:
        LayoutError: no cache, or a study neither prepared nor failed.
        ConfigError: the cache was prepared with another crop geometry.
    """
    cache, settings = _open(cache_dir, command)
    _compare(cache, settings.get("crop", {}), to_dict(crop_cfg), "crop", "data.crop", command)
    uids = _without_excluded(uids, exclude)
    records = cache.records()
    failures = cache.failures(records)
    rows, missing = [], []
    for uid in uids:
        record = records.get(uid)
        if record is not None and record.get("crop_file"):
            rows.append({"StudyInstanceUID": uid, "path": str(cache.resolve(record["crop_file"])), "status": "cached",
                         "mask_source": record.get("mask_source", ""), "n_present": record.get("n_present", 0),
                         "has_boxes": record.get("has_boxes", False), "error": ""})
        elif record is not None or uid in failures:
            reason = record.get("reason", "") if record is not None else failures[uid].get("reason", "")
            rows.append({"StudyInstanceUID": uid, "path": "", "status": "failed", "error": reason})
        else:
            missing.append(uid)
    _refuse_missing(cache, missing, len(uids), command)
    index = pd.DataFrame(rows).reindex(columns=list(INDEX_COLUMNS))
    left_out = index[index["status"] == "failed"]
    if len(left_out):
        log.warning("stage 2: %d of %d studies have no crops and are left out, e.g. %s: %s", len(left_out),
                    len(index), left_out["StudyInstanceUID"].iloc[0], left_out["error"].iloc[0])
    return index

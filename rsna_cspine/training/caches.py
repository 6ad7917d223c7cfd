"""Refuse to train on a preprocessing cache that is not complete when several processes train together.

Building a cache inside a DDP job would leave every other rank waiting at a collective (NCCL gives up
after ten minutes) while rank 0 decodes DICOM. So under torchrun the trainers only read caches, and a
missing or incomplete one stops the job at once with the command that builds it; a plain single-process
run builds what is missing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rsna_cspine.errors import LayoutError


def _refuse(what: str, cache_dir: Path, missing: list[str], total: int, command: str) -> None:
    raise LayoutError(
        f"{what} cache is missing or incomplete ({len(missing)} of {total} studies not built, e.g. {missing[:3]}). "
        f"Under torchrun the trainers only read caches: build it first in one process with `{command}` "
        "(same config and overrides), then start torchrun again",
        cache_dir,
    )


def _failed(table: Path, status_column: str | None = None) -> dict[str, str]:
    """Studies a previous build listed as failed (uid → error)."""
    if not table.is_file():
        return {}
    frame = pd.read_csv(table, dtype={"StudyInstanceUID": str}, keep_default_na=False)
    if status_column is not None:
        frame = frame[frame[status_column] == "failed"]
    return dict(zip(frame["StudyInstanceUID"], frame.get("error", pd.Series([""] * len(frame)))))


def require_crop_cache(cache_dir: str | Path, uids: Sequence[str], crop_cfg: object, command: str) -> pd.DataFrame:
    """The crop cache index of ``uids`` (what ``crops.build_crop_cache`` returns), without building anything.

    Args:
        cache_dir: the crop cache folder.
        uids: studies the run needs.
        crop_cfg: the run's ``CropConfig`` (the folder must have been built with it).
        command: the command line that builds the cache, for the error message.

    Raises:
        LayoutError: a study has neither crops nor a recorded failure, or the folder holds no cache.
        ConfigError: the folder was built with other crop settings.
    """
    from rsna_cspine.crops.cache import INDEX_COLUMNS, INDEX_FILE, SETTINGS_FILE, _check_settings, crop_path

    cache_dir = Path(cache_dir)
    unique = list(dict.fromkeys(uids))
    if not (cache_dir / SETTINGS_FILE).is_file():
        _refuse("crop", cache_dir, unique, len(unique), command)
    _check_settings(cache_dir, crop_cfg)  # reads only: the settings file exists
    failed = _failed(cache_dir / INDEX_FILE, "status")
    rows, missing = [], []
    for uid in unique:
        path = crop_path(cache_dir, uid)
        if path.is_file():
            rows.append({"StudyInstanceUID": uid, "path": str(path), "status": "cached", "error": ""})
        elif uid in failed:
            rows.append({"StudyInstanceUID": uid, "path": str(path), "status": "failed", "error": failed[uid]})
        else:
            missing.append(uid)
    if missing:
        _refuse("crop", cache_dir, missing, len(unique), command)
    return pd.DataFrame(rows).reindex(columns=list(INDEX_COLUMNS))


def require_seg_cache(
    cache_dir: str | Path, uids: Sequence[str], grid: Sequence[int], hu_window: Sequence[float], antialias: bool,
    command: str,
) -> dict[str, Path]:
    """uid → stage-1 cache file of every study of ``uids`` that was built (what ``seg.build_cache`` returns),
    without building anything; studies a build listed in ``cache_failures.csv`` are left out.

    Args:
        cache_dir: the stage-1 cache folder.
        uids: studies the run needs.
        grid: the run's grid; files built for another grid, window or antialias setting do not count.
        hu_window: the run's HU window.
        antialias: the run's antialias setting.
        command: the command line that builds the cache, for the error message.

    Raises:
        LayoutError: a study has neither a matching file nor a recorded failure.
    """
    from rsna_cspine.seg.preprocess import _cache_matches

    cache_dir = Path(cache_dir)
    failed = _failed(cache_dir / "cache_failures.csv")
    done: dict[str, Path] = {}
    missing = []
    for uid in uids:
        path = cache_dir / f"{uid}.npz"
        if path.is_file() and _cache_matches(path, grid, hu_window, antialias):
            done[uid] = path
        elif uid not in failed:
            missing.append(uid)
    if missing:
        _refuse("stage-1", cache_dir, missing, len(uids), command)
    return done

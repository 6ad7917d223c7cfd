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
from rsna_cspine.runner import LEDGER_FOLDER, read_ledger


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
    """The crop cache index of ``uids`` (what ``crops.build_crop_cache`` returns), without building or writing.

    Args:
        cache_dir: the crop cache folder.
        uids: studies the run needs.
        crop_cfg: the run's ``CropConfig`` (the folder must have been built with it).
        command: the command line that builds the cache, for the error message.

    Raises:
        LayoutError: a study has neither crops nor a recorded failure.
        ConfigError: the folder was built with other crop settings.
    """
    from rsna_cspine.crops.cache import INDEX_COLUMNS, INDEX_FILE, crop_cache_fingerprint, crop_path

    cache_dir = Path(cache_dir)
    unique = list(dict.fromkeys(uids))
    built = read_ledger(cache_dir / LEDGER_FOLDER, crop_cache_fingerprint(crop_cfg))
    failed = _failed(cache_dir / INDEX_FILE, "status")
    rows, missing = [], []
    for uid in unique:
        if uid in built:
            record = built[uid]
            rows.append({"StudyInstanceUID": uid, "path": str(crop_path(cache_dir, uid)), "status": "cached",
                         "mask_source": record.get("mask_source", ""), "n_present": record.get("n_present", 0),
                         "has_boxes": record.get("has_boxes", False), "error": ""})
        elif uid in failed:
            rows.append({"StudyInstanceUID": uid, "path": str(crop_path(cache_dir, uid)), "status": "failed",
                         "error": failed[uid]})
        else:
            missing.append(uid)
    if missing:
        _refuse("crop", cache_dir, missing, len(unique), command)
    return pd.DataFrame(rows).reindex(columns=list(INDEX_COLUMNS))


def require_seg_cache(
    cache_dir: str | Path, uids: Sequence[str], grid: Sequence[int], hu_window: Sequence[float], antialias: bool,
    command: str, cascade: object | None = None,
) -> dict[str, Path]:
    """uid → stage-1 cache file of every study of ``uids`` that was built (what ``seg.build_cache`` returns),
    without building or writing; studies a build listed in ``cache_failures.csv`` are left out.

    Args:
        cache_dir: the stage-1 cache folder.
        uids: studies the run needs.
        grid: the run's grid.
        hu_window: the run's HU window.
        antialias: the run's antialias setting.
        command: the command line that builds the cache, for the error message.
        cascade: the run's ``seg.boxes.CascadeGeometry`` (None: whole-volume grid).

    Raises:
        LayoutError: a study has neither a cache file nor a recorded failure.
        ConfigError: the folder was built with other preprocessing settings.
    """
    from rsna_cspine.seg.preprocess import cache_fingerprint

    cache_dir = Path(cache_dir)
    built = read_ledger(cache_dir / LEDGER_FOLDER, cache_fingerprint(grid, hu_window, antialias, cascade))  # type: ignore[arg-type]
    failed = _failed(cache_dir / "cache_failures.csv")
    done = {uid: Path(built[uid]["outputs"][0]) for uid in uids if uid in built}
    missing = [uid for uid in uids if uid not in done and uid not in failed]
    if missing:
        _refuse("stage-1", cache_dir, missing, len(uids), command)
    return done

"""The prepared cache folder: where each product of a study lives, the manifest, and joining shard folders.

::

    CACHE/
      prepare.yaml             the settings it was prepared with (human-readable copy of the fingerprint)
      finished/                the ledger: fingerprint.json + one <uid>.json per prepared study (its
                               manifest row, the files it wrote relative to CACHE, its inputs' fingerprint)
      finished/failed/<uid>.json   the last failure of a study not prepared since
      seg/<uid>.npz            stage-1 input: the volume on the grid (+ labels where a segmentation exists)
      masks/<uid>_mask.npz     the full-resolution mask the crops were cut from (``mask``, ``slice_numbers``)
      crops/<uid>.npz          the seven 2.5D stacks with slice labels and box maps
      manifest.csv             one row per study of every shard: status, geometry, timings, warnings

Every path a record names is relative to CACHE, so the folder can be moved, and folders prepared by
several machines (``--shard i/N --out CACHE_i``) can be joined by :func:`merge_caches`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.io.files import atomic_write_text
from rsna_cspine.ledger import (
    FAILED_FOLDER,
    FINGERPRINT_FILE,
    LEDGER_FOLDER,
    Record,
    StudyLedger,
    outputs_exist,
    read_failures,
    read_fingerprint,
    read_ledger,
)

log = logging.getLogger(__name__)

SETTINGS_FILE = "prepare.yaml"
MANIFEST_FILE = "manifest.csv"
#: One row per study: what ``manifest.csv`` lists, in this order (``seconds_*`` per step of the study).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID", "status", "reason", "n_slices", "rows", "cols", "spacing_z", "spacing_y", "spacing_x",
    "has_labels", "mask_source", "n_present", "has_boxes", "seg_file", "mask_file", "crop_file", "bytes",
    "decode_workers", "seconds_load", "seconds_stage1", "seconds_mask", "seconds_crops", "seconds_total",
    "seconds_cpu", "warnings",
)  # fmt: skip


@dataclass(frozen=True)
class PreparedCache:
    """Paths and read-only views of one prepared cache folder.

    Args:
        root: the cache folder.
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def ledger_dir(self) -> Path:
        return self.root / LEDGER_FOLDER

    def seg_path(self, uid: str) -> Path:
        return self.root / "seg" / f"{uid}.npz"

    def mask_path(self, uid: str) -> Path:
        return self.root / "masks" / f"{uid}_mask.npz"

    def crop_path(self, uid: str) -> Path:
        return self.root / "crops" / f"{uid}.npz"

    def relative(self, path: Path) -> str:
        """A file of the cache as its records name it (relative to the cache folder)."""
        return path.relative_to(self.root).as_posix()

    def resolve(self, name: str) -> Path:
        """The file a record names."""
        return self.root / name

    def ledger(self, settings: dict[str, Any], **options: Any) -> StudyLedger:
        """The writable ledger of the cache under ``settings`` (what a prepare run records studies in).

        Args:
            settings: the fingerprint (``prepare.config.settings_fingerprint``).
            options: further :class:`~rsna_cspine.ledger.StudyLedger` arguments (``resume``, ``on_change``,
                ``inputs``); paths are relative to the cache and failures are kept.
        """
        return StudyLedger(self.ledger_dir, settings, base=self.root, keep_failures=True, **options)

    def settings(self) -> dict[str, Any] | None:
        """The fingerprint the cache was prepared with (None: no prepared cache here)."""
        return read_fingerprint(self.ledger_dir)

    def records(self) -> dict[str, Record]:
        """uid → record of every prepared study (all shards) whose files all exist."""
        return read_ledger(self.ledger_dir, None, base=self.root)

    def failures(self, records: dict[str, Record] | None = None) -> dict[str, Record]:
        """uid → failure (``reason``) of every study that failed and was not prepared since.

        Args:
            records: :meth:`records`, when the caller has read them already.
        """
        done = self.records() if records is None else records
        return {uid: f for uid, f in read_failures(self.ledger_dir).items() if uid not in done}

    def manifest(self) -> pd.DataFrame:
        """One row per prepared or failed study, sorted by uid (:data:`MANIFEST_COLUMNS`)."""
        records = self.records()
        rows = [{k: v for k, v in r.items() if k in MANIFEST_COLUMNS} for r in records.values()]
        rows += [{"StudyInstanceUID": uid, "status": "failed", "reason": f.get("reason", ""),
                  "seconds_total": f.get("seconds")} for uid, f in self.failures(records).items()]
        for row in rows:
            row["warnings"] = " | ".join(row.get("warnings") or [])
        table = pd.DataFrame(rows).reindex(columns=list(MANIFEST_COLUMNS))
        return table.sort_values("StudyInstanceUID", kind="stable").reset_index(drop=True)

    def write_manifest(self) -> Path:
        """Write ``manifest.csv`` (atomically) from the ledger: every shard's studies, as they stand now."""
        return atomic_write_text(self.root / MANIFEST_FILE, self.manifest().to_csv(index=False))

    def write_settings(self, fingerprint: dict[str, Any]) -> Path:
        """Write ``prepare.yaml``, the settings in readable form."""
        return atomic_write_text(self.root / SETTINGS_FILE, yaml.safe_dump(fingerprint, sort_keys=False))


def _place(source: Path, target: Path) -> None:
    """Put a copy of ``source`` at ``target``: a hard link where both are on one file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.merging")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def merge_caches(sources: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Join prepared caches (e.g. one per machine of a job array) into ``out``; returns its manifest.

    Every source must have been prepared with the same settings (and ``out``, if it holds a cache
    already); a study prepared in several is taken from the first that has it (``out`` first), a
    failure only where no source prepared the study. Files are hard-linked where possible, else copied;
    each study's record is written after its files, so an interrupted merge can simply be run again.

    Args:
        sources: the caches to join.
        out: the joined cache (created).

    Raises:
        ConfigError: the caches were prepared with other settings.
        LayoutError: a source is not a prepared cache.
    """
    target = PreparedCache(out)
    caches = [PreparedCache(s) for s in sources]
    settings = target.settings()
    for cache in caches:
        found = cache.settings()
        if found is None:
            raise LayoutError("not a prepared cache (no finished/fingerprint.json)", cache.root)
        if settings is not None and found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise ConfigError(f"was prepared with other settings than the others (differs in {changed})", cache.root)
        settings = found
    if settings is None:
        raise ConfigError("nothing to merge: give at least one prepared cache")
    target.ledger_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target.ledger_dir / FINGERPRINT_FILE, json.dumps(settings, indent=1))
    target.write_settings(settings)
    done = target.records()
    for cache in caches:
        if cache.root.resolve() == target.root.resolve():
            continue
        for uid, record in cache.records().items():
            if uid in done:
                continue
            for name in record.get("outputs", []):
                _place(cache.resolve(name), target.resolve(name))
            if not outputs_exist(record, target.root):
                raise LayoutError(f"study {uid}: its files did not arrive", target.root)
            atomic_write_text(target.ledger_dir / f"{uid}.json", json.dumps(record))
            (target.ledger_dir / FAILED_FOLDER / f"{uid}.json").unlink(missing_ok=True)
            done[uid] = record
    for cache in caches:
        for uid, failure in cache.failures().items():
            if uid not in done:
                atomic_write_text(target.ledger_dir / FAILED_FOLDER / f"{uid}.json", json.dumps(failure))
    target.write_manifest()
    log.info("merged %d cache(s) into %s: %d studies prepared", len(caches), target.root, len(done))
    return target.manifest()

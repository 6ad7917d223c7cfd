"""The resume ledger of the batch jobs: which studies are finished, under which inputs and settings.

A ledger folder holds one JSON file per finished study, each written atomically, so several processes
or machines can fill one folder, each with its own shard::

    fingerprint.json   what every record here was made with (the settings that decide the results)
    <uid>.json         one finished study: the study function's record; paths under "outputs" must
                       exist (relative ones are resolved against the ledger's ``base`` folder)
    failed/<uid>.json  with ``keep_failures``: the last failure of a study not finished since

:class:`StudyLedger` is what a :class:`~rsna_cspine.runner.StudyRunner` writes; :func:`read_ledger`,
:func:`read_fingerprint` and :func:`read_failures` read a folder without writing anything (what every
rank of a torchrun job may do at once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsna_cspine.errors import ConfigError
from rsna_cspine.io.files import atomic_write_text

logger = logging.getLogger(__name__)

#: Name of the ledger folder the caches keep beside their files.
LEDGER_FOLDER = "finished"
FINGERPRINT_FILE = "fingerprint.json"
#: Sub-folder of a ledger that keeps failure records (``keep_failures``).
FAILED_FOLDER = "failed"
#: What a study function returns: a JSON-able mapping (``outputs``: files it wrote).
Record = dict[str, Any]


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Resolved path, size and modification time of an input file (for a ledger fingerprint).

    Args:
        path: e.g. a checkpoint.
    """
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a record being written elsewhere)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class StudyLedger:
    """Finished studies of one batch folder, valid for one fingerprint.

    Args:
        folder: the ledger folder (created).
        fingerprint: JSON-able inputs and settings that decide every study's result.
        resume: keep earlier records made with the same fingerprint (False forgets them all).
        on_change: what to do when the folder holds records made with another fingerprint:
            ``restart`` forgets them (logged), ``refuse`` raises :class:`ConfigError` (for caches
            that must never mix settings).
        adopt: for a study without a record, the record of outputs made outside the ledger (written by
            hand, or by a version before it) when they are fit to keep, else None; adopted records are saved.
        base: folder that relative ``outputs`` paths are resolved against (None: the working folder).
            Records with relative paths stay valid when the whole folder is moved or merged.
        inputs: the study's own inputs as a JSON-able value (e.g. its files' names and sizes); a record
            whose ``inputs`` entry differs from today's is not finished (the study is done again).
        keep_failures: keep each failure as ``failed/<uid>.json`` (shards sharing the folder each leave
            theirs) until the study finishes.
    """

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any], *, resume: bool = True,
                 on_change: str = "restart", adopt: Callable[[str], Record | None] | None = None,
                 base: str | Path | None = None, inputs: Callable[[str], Any] | None = None,
                 keep_failures: bool = False) -> None:
        if on_change not in ("restart", "refuse"):
            raise ValueError(f"on_change must be 'restart' or 'refuse', got {on_change!r}")
        self.folder = Path(folder)
        self.base = None if base is None else Path(base)
        self.inputs = inputs
        self.keep_failures = keep_failures
        self.adopt = adopt if resume else None
        self.fingerprint = json.loads(json.dumps(fingerprint))  # tuples → lists, as stored
        stamp = self.folder / FINGERPRINT_FILE
        stored = _read_json(stamp) if stamp.is_file() else None
        if stored is not None and stored != self.fingerprint:
            if on_change == "refuse":
                keys = set(stored) | set(self.fingerprint)
                changed = sorted(k for k in keys if stored.get(k) != self.fingerprint.get(k))
                raise ConfigError(f"was built with other settings (differs in {changed}); use another folder", self.folder)
            logger.warning("%s holds results of other inputs or settings: starting afresh", self.folder)
        if stored != self.fingerprint or not resume:
            self.forget()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, json.dumps(self.fingerprint, indent=1))

    def _path(self, uid: str) -> Path:
        return self.folder / f"{uid}.json"

    def forget(self) -> None:
        """Drop every record and failure (the output files stay; they are rewritten as studies are redone)."""
        if self.folder.is_dir():
            for old in [*self.folder.glob("*.json"), *(self.folder / FAILED_FOLDER).glob("*.json")]:
                old.unlink(missing_ok=True)

    def finished(self, uid: str) -> Record | None:
        """The study's record when it is finished, every output it names still exists and (with
        ``inputs``) its inputs are unchanged; else None.

        Args:
            uid: the study.
        """
        record = _read_json(self._path(uid))
        if not isinstance(record, dict) and self.adopt is not None and isinstance(record := self.adopt(uid), dict):
            self.save(uid, record)
        if not isinstance(record, dict) or not outputs_exist(record, self.base):
            return None
        if self.inputs is not None and json.loads(json.dumps(self.inputs(uid))) != record.get("inputs"):
            return None
        return record

    def save(self, uid: str, record: Record) -> None:
        """Record a finished study (atomically: a killed run leaves the old state or the new one).

        Args:
            uid: the study.
            record: JSON-able; ``outputs`` lists the files the study wrote.
        """
        atomic_write_text(self._path(uid), json.dumps(record))
        (self.folder / FAILED_FOLDER / f"{uid}.json").unlink(missing_ok=True)

    def save_failure(self, uid: str, reason: str, seconds: float = 0.0) -> None:
        """A study failed: drop its record, if any (it was stale, or the study would not have run: its inputs
        changed or an output went missing), and keep the failure (with ``keep_failures``) until it finishes.

        Args:
            uid: the study.
            reason: why it failed.
            seconds: time spent on it.
        """
        self._path(uid).unlink(missing_ok=True)
        if self.keep_failures:
            atomic_write_text(self.folder / FAILED_FOLDER / f"{uid}.json",
                              json.dumps({"reason": reason, "seconds": round(seconds, 3)}))

    def records(self) -> dict[str, Record]:
        """Every finished study in the folder (all shards), by uid, in file-name order."""
        found = {}
        for path in sorted(self.folder.glob("*.json")):
            if path.name != FINGERPRINT_FILE and (record := self.finished(path.stem)) is not None:
                found[path.stem] = record
        return found


def outputs_exist(record: Record, base: str | Path | None = None) -> bool:
    """Whether every file a record lists under ``outputs`` exists (relative paths resolved against ``base``).

    Args:
        record: a ledger record.
        base: folder of relative paths (None: the working folder).
    """
    root = Path(base) if base is not None else Path()
    return all((root / p).is_file() for p in record.get("outputs", []))


def read_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The fingerprint a ledger folder's records were made with (None when it holds no ledger).

    Args:
        folder: the ledger folder.
    """
    stored = _read_json(Path(folder) / FINGERPRINT_FILE)
    return stored if isinstance(stored, dict) else None


def read_ledger(folder: str | Path, fingerprint: dict[str, Any] | None, base: str | Path | None = None) -> dict[str, Record]:
    """The finished studies of a ledger folder made with ``fingerprint``, read without writing anything.

    What several processes may do at once (every rank of a torchrun job checking a cache): unlike
    :class:`StudyLedger` it never stamps the folder, forgets records or adopts files.

    Args:
        folder: the ledger folder.
        fingerprint: the inputs and settings the records must have been made with (None: whatever the
            folder says; the caller compares :func:`read_fingerprint` itself).
        base: folder of relative output paths (see :class:`StudyLedger`).

    Returns:
        uid → record of every study whose outputs all exist (empty when the folder holds no ledger).

    Raises:
        ConfigError: the folder's records were made with another fingerprint.
    """
    folder = Path(folder)
    stored = read_fingerprint(folder)
    if stored is None:
        return {}
    if fingerprint is not None and stored != (wanted := json.loads(json.dumps(fingerprint))):
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ConfigError(f"was built with other settings (differs in {changed}); use another folder", folder)
    found: dict[str, Record] = {}
    for path in sorted(folder.glob("*.json")):
        record = _read_json(path)
        if path.name != FINGERPRINT_FILE and isinstance(record, dict) and outputs_exist(record, base):
            found[path.stem] = record
    return found


def read_failures(folder: str | Path) -> dict[str, Record]:
    """uid → failure record (``reason``, ``seconds``) a ledger kept with ``keep_failures``, read-only.

    Args:
        folder: the ledger folder.
    """
    found: dict[str, Record] = {}
    for path in sorted((Path(folder) / FAILED_FOLDER).glob("*.json")):
        if isinstance(record := _read_json(path), dict):
            found[path.stem] = record
    return found

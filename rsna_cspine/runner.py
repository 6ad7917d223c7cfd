"""One per-study loop for every batch job: shard selection, resume, a failure list and a progress bar.

``predict``, ``predict-seg``, the stage-1 cache and the crop cache each give a :class:`StudyRunner` a
list of study ids and a function that does one study and returns a JSON-able record. The runner

* keeps the shard's studies (``shard=(i, n)``: study ``k`` of the list when ``k % n == i``);
* skips the studies a :class:`StudyLedger` holds as finished under the same fingerprint (the inputs
  and settings that decide the result) whose output files still exist;
* calls the function for the rest, in this process or in ``workers`` spawned processes;
* records each finished study in the ledger as soon as it is done, so a killed run resumes there;
* lists every failure with its reason (a failing study never stops the batch, whatever it raises);
* shows a tqdm bar (studies/s, ETA, counts).

The ledger (what is finished, under which fingerprint) lives in :mod:`rsna_cspine.ledger`; its names
are importable from here too.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.io.files import atomic_write_text
from rsna_cspine.ledger import (  # noqa: F401 - the ledger's names, importable from the runner as before
    FAILED_FOLDER,
    FINGERPRINT_FILE,
    LEDGER_FOLDER,
    Record,
    StudyLedger,
    file_fingerprint,
    outputs_exist,
    read_failures,
    read_fingerprint,
    read_ledger,
)

__all__ = [
    "FAILED_FOLDER", "FINGERPRINT_FILE", "LEDGER_FOLDER", "STATUSES", "BatchReport", "Record", "StudyError",
    "StudyLedger", "StudyOutcome", "StudyPlan", "StudyRunner", "StudySkipped", "attempt", "file_fingerprint",
    "outputs_exist", "parse_shard", "read_failures", "read_fingerprint", "read_ledger", "release_memory",
    "shard_studies", "split_cpus", "usable_cpus",
]

logger = logging.getLogger(__name__)

#: Outcome statuses: finished now, finished earlier, failed, or left for later by the function.
STATUSES: tuple[str, ...] = ("done", "resumed", "failed", "skipped")


class StudyError(CSpineError):
    """A study function's failure whose message is already the report's reason (e.g. the stage and cause).

    Any other exception is reported as ``<class name>: <message>``.
    """


class StudySkipped(Exception):
    """Raised by a study function for a study it does not run now (e.g. out of time); not a failure.

    Args:
        reason: why, for the report.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 ≤ i < n``.

    Args:
        text: e.g. ``"2/4"`` (the third of four shards).
    """
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise ConfigError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard i/n needs n ≥ 1 and 0 ≤ i < n, got {text!r}")
    return index, count


def shard_studies(uids: Sequence[str], shard: tuple[int, int]) -> list[str]:
    """The studies of one shard: those at positions ``k`` with ``k % n == i``.

    Args:
        uids: every study, in a fixed order (test.csv order for predict).
        shard: ``(i, n)``.
    """
    index, count = shard
    return [uid for k, uid in enumerate(uids) if k % count == index]


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or container allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_cpus(budget: int, workers: int) -> tuple[int, int]:
    """Share a CPU budget between studies run in parallel: ``(workers, threads per study)``.

    ``workers`` studies run at once and each gets ``budget // workers`` threads (its decoder processes
    and torch threads), so never more threads are busy than the budget; a study alone gets all of it.

    Args:
        budget: cores to use in all (≥ 1).
        workers: studies at once (≥ 1; more than ``budget`` is cut to ``budget``).
    """
    if budget < 1 or workers < 1:
        raise ValueError(f"budget and workers must be ≥ 1, got {budget}, {workers}")
    workers = min(workers, budget)
    return workers, budget // workers


@dataclass
class StudyOutcome:
    """What happened to one study in a batch.

    Attributes:
        uid: the study.
        status: ``done`` (finished now), ``resumed`` (finished earlier), ``failed`` or ``skipped``.
        record: the function's record (the stored one when resumed); None when failed or skipped.
        reason: why it failed or was skipped.
        seconds: time spent on it now.
    """

    uid: str
    status: str
    record: Record | None = None
    reason: str = ""
    seconds: float = 0.0


@dataclass
class StudyPlan:
    """The studies a batch selected, those it resumes and those it still has to do, in list order."""

    selected: list[str]
    resumed: dict[str, Record]
    todo: list[str]


@dataclass
class BatchReport:
    """One outcome per selected study, in the order given."""

    outcomes: list[StudyOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def records(self) -> dict[str, Record]:
        """Finished studies (now or earlier) → record."""
        return {o.uid: o.record for o in self.outcomes if o.status in ("done", "resumed") and o.record is not None}

    @property
    def failures(self) -> dict[str, str]:
        """Failed studies → reason."""
        return {o.uid: o.reason for o in self.outcomes if o.status == "failed"}


class StudyRunner:
    """Runs one function over many studies (see the module docstring).

    Args:
        ledger: where finished studies are recorded and found again (None: no resume).
        shard: ``(i, n)`` to run only studies ``k`` with ``k % n == i``.
        workers: processes running studies in parallel (0 = in this process). The study function
            must then be picklable (a module-level function or a ``functools.partial`` of one).
        worker_threads: torch threads of each worker process (workers × threads ≤ the CPU budget).
        desc: name of the job (progress bar, log lines).
        progress: show a tqdm bar.
        failures_csv: where this run's failures (StudyInstanceUID, error) are listed; removed when
            none failed. None: only logged and returned.
    """

    def __init__(
        self,
        ledger: StudyLedger | None = None,
        *,
        shard: tuple[int, int] | None = None,
        workers: int = 0,
        worker_threads: int = 1,
        desc: str = "studies",
        progress: bool = True,
        failures_csv: str | Path | None = None,
    ) -> None:
        if workers < 0 or worker_threads < 1:
            raise ValueError(f"workers must be ≥ 0 and worker_threads ≥ 1, got {workers}, {worker_threads}")
        self.ledger = ledger
        self.shard = shard
        self.workers = workers
        self.worker_threads = worker_threads
        self.desc = desc
        self.progress = progress
        self.failures_csv = None if failures_csv is None else Path(failures_csv)

    def plan(self, uids: Sequence[str]) -> StudyPlan:
        """Select the shard's studies (duplicates dropped, order kept) and split them into resumed and to do.

        Args:
            uids: every study of the batch, in a fixed order.
        """
        selected = list(dict.fromkeys(str(u) for u in uids))
        if self.shard is not None:
            selected = shard_studies(selected, self.shard)
        resumed: dict[str, Record] = {}
        if self.ledger is not None:
            for uid in selected:
                if (record := self.ledger.finished(uid)) is not None:
                    resumed[uid] = record
        return StudyPlan(selected, resumed, [u for u in selected if u not in resumed])

    def run(self, uids: Sequence[str] | StudyPlan, work: Callable[[str], Record]) -> BatchReport:
        """Run ``work(uid)`` for every selected study not yet finished.

        Args:
            uids: the studies (or a plan from :meth:`plan`).
            work: does one study and returns its record; raising marks the study failed (the
                reason is the error), raising :class:`StudySkipped` leaves it for a later run.

        Returns:
            One outcome per selected study, in order.
        """
        plan = uids if isinstance(uids, StudyPlan) else self.plan(uids)
        outcomes = {uid: StudyOutcome(uid, "resumed", record) for uid, record in plan.resumed.items()}
        logger.info("%s: %d studies, %d already finished, %d to do", self.desc, len(plan.selected),
                    len(plan.resumed), len(plan.todo))
        bar = tqdm(total=len(plan.todo), desc=self.desc, unit="study", disable=not self.progress or None,
                   dynamic_ncols=True)
        try:
            for outcome in self._outcomes(plan.todo, work):
                self._settle(outcome)
                outcomes[outcome.uid] = outcome
                bar.update()
                counts = {s: sum(o.status == s for o in outcomes.values()) for s in STATUSES}
                bar.set_postfix({s: n for s, n in counts.items() if n}, refresh=False)
        finally:
            bar.close()
        report = BatchReport([outcomes[uid] for uid in plan.selected if uid in outcomes])
        logger.info("%s: %d done, %d resumed, %d failed, %d skipped", self.desc, report.count("done"),
                    report.count("resumed"), report.count("failed"), report.count("skipped"))
        self._write_failures(report)
        return report

    def _outcomes(self, todo: list[str], work: Callable[[str], Record]):
        if self.workers == 0 or not todo:
            for uid in todo:
                yield attempt(work, uid)
            return
        context = get_context("spawn")  # no fork: the parent may hold torch threads and CUDA state
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_install_worker,
                                 initargs=(work, self.worker_threads)) as pool:
            futures = {pool.submit(_attempt_installed, uid): uid for uid in todo}
            try:
                for future in as_completed(futures):
                    try:
                        yield future.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process itself died (BrokenProcessPool)
                        yield StudyOutcome(futures[future], "failed", reason=f"worker process died: {exc.__class__.__name__}: {exc}")
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def _settle(self, outcome: StudyOutcome) -> None:
        if outcome.status == "done" and self.ledger is not None:
            self.ledger.save(outcome.uid, outcome.record or {})
        elif outcome.status == "failed":
            logger.warning("%s: study %s failed: %s", self.desc, outcome.uid, outcome.reason)
            if self.ledger is not None:
                self.ledger.save_failure(outcome.uid, outcome.reason, outcome.seconds)
        elif outcome.status == "skipped":
            logger.info("%s: study %s skipped: %s", self.desc, outcome.uid, outcome.reason)

    def _write_failures(self, report: BatchReport) -> None:
        if self.failures_csv is None:
            return
        failures = report.failures
        if failures:
            table = pd.DataFrame({"StudyInstanceUID": list(failures), "error": list(failures.values())})
            atomic_write_text(self.failures_csv, table.to_csv(index=False))
        else:
            self.failures_csv.unlink(missing_ok=True)


def attempt(work: Callable[[str], Record], uid: str) -> StudyOutcome:
    """Run one study; whatever it raises (native decoder panics too) becomes a failed outcome.

    Args:
        work: the study function.
        uid: the study.
    """
    start = time.perf_counter()
    try:
        record = work(uid)
    except (KeyboardInterrupt, SystemExit):
        raise
    except StudySkipped as exc:
        return StudyOutcome(uid, "skipped", reason=exc.reason, seconds=time.perf_counter() - start)
    except BaseException as exc:  # noqa: BLE001 - pyo3 panics (Rust decoders) are BaseExceptions, not Exceptions
        reason = exc.reason if isinstance(exc, StudyError) else f"{exc.__class__.__name__}: {exc}"
        del exc
        release_memory()
        return StudyOutcome(uid, "failed", reason=reason, seconds=time.perf_counter() - start)
    return StudyOutcome(uid, "done", record=record, seconds=time.perf_counter() - start)


def release_memory() -> None:
    """Free what a failed study left behind (its arrays may have sat in the traceback until now)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


_WORKER_FUNCTION: Callable[[str], Record] | None = None


def _install_worker(work: Callable[[str], Record], threads: int) -> None:
    """Worker process start: keep the study function (unpickled once, not per study), limit threads."""
    import torch
    from threadpoolctl import threadpool_limits

    global _WORKER_FUNCTION
    _WORKER_FUNCTION = work
    torch.set_num_threads(threads)  # processes give the parallelism; more threads would oversubscribe
    threadpool_limits(limits=threads)  # numpy's and scipy's BLAS and OpenMP pools too (for the process's life)


def _attempt_installed(uid: str) -> StudyOutcome:
    assert _WORKER_FUNCTION is not None
    return attempt(_WORKER_FUNCTION, uid)

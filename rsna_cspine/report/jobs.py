"""The viewer's jobs: one study each, run one at a time, and what is kept of them on disk.

Patient data must not linger. Each job owns one folder under the viewer's work folder (marked with
:data:`JOB_MARKER`); an uploaded study's files are deleted as soon as its pictures and table are made,
a failed job's folder as soon as it fails, the oldest finished jobs beyond ``keep_finished`` (folder and
page) when a newer one finishes, and every job folder when the viewer stops. Job folders a killed viewer
left behind are removed by :func:`remove_leftover_jobs` at the next start.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsna_cspine.errors import CSpineError
from rsna_cspine.report.explain import StudyExplainer, StudyExplanation
from rsna_cspine.report.uploads import UploadRejected

logger = logging.getLogger(__name__)

#: File in every job folder: only folders holding it are ever removed as leftovers.
JOB_MARKER = ".rsna-cspine-job"


def make_job_folder(root: Path) -> Path:
    """Create a job's own folder (with its marker) and return it.

    Args:
        root: the folder to create (``<work dir>/<job id>``).
    """
    root.mkdir(parents=True)
    (root / JOB_MARKER).touch()
    return root


def remove_leftover_jobs(work_dir: Path) -> int:
    """Remove the job folders an earlier viewer left in ``work_dir`` (killed before it could clean up).

    Args:
        work_dir: the viewer's work folder; only sub-folders holding :data:`JOB_MARKER` are touched.

    Returns:
        How many folders were removed.
    """
    removed = 0
    for folder in Path(work_dir).iterdir() if Path(work_dir).is_dir() else ():
        if folder.is_dir() and (folder / JOB_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d job folder(s) left by an earlier run in %s", removed, work_dir)
    return removed


@dataclass
class Job:
    """One study being (or having been) analysed.

    Attributes:
        id: random hex id (also the job's folder name).
        study: what the user sees as the study's name.
        folder: the study's DICOM folder.
        out_dir: where the pictures go.
        root: the job's own folder (removed with the job); None when it has none.
        scratch: study files deleted as soon as the job finishes (an upload's unpacked study).
        state: ``queued``, ``running``, ``done`` or ``failed``.
        message: what is happening now (or the last stage reached).
        fraction: share of the work done, 0..1.
        error: why it failed (server paths replaced by the study's name).
        explanation: the result once done.
        seconds: run time once finished.
    """

    id: str
    study: str
    folder: Path
    out_dir: Path
    root: Path | None = None
    scratch: Path | None = None
    state: str = "queued"
    message: str = "waiting for the worker"
    fraction: float = 0.0
    error: str | None = None
    explanation: StudyExplanation | None = None
    seconds: float = 0.0
    created: float = field(default_factory=time.time)

    @property
    def percent(self) -> int:
        return int(round(100 * self.fraction))

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def files(self) -> dict[str, Path]:
        """Picture file name → path, for the pictures this job wrote (the only files it serves)."""
        if self.explanation is None:
            return {}
        paths = [self.explanation.overview, self.explanation.table]
        paths += [p for item in self.explanation.vertebrae for p in item.pictures.values()]
        return {p.name: p for p in paths if p is not None}

    def to_json(self) -> dict[str, Any]:
        """The job's status (and its result once done) as the API returns it."""
        body: dict[str, Any] = {
            "id": self.id,
            "study": self.study,
            "state": self.state,
            "message": self.message,
            "percent": self.percent,
            "error": self.error,
        }
        if self.explanation is not None:
            body["probabilities"] = dict(self.explanation.probabilities)
            body["warnings"] = list(self.explanation.prediction.warnings)
            body["files"] = {name: f"/jobs/{self.id}/files/{name}" for name in self.files()}
            body["missing"] = {
                f"{item.vertebra}_{kind}": reason for item in self.explanation.vertebrae for kind, reason in item.missing.items()
            }
            body["seconds"] = round(self.seconds, 3)
        return body

    def redact(self, message: str) -> str:
        """``message`` with the server's paths of this job replaced by the study's name."""
        for path, shown in ((self.folder, self.study), (self.root, "<upload>")):
            if path is not None:
                message = message.replace(str(path), shown)
        return message


class JobQueue:
    """Runs jobs one at a time in a background thread (the models are not shared between threads).

    Args:
        explainer: the loaded models.
        max_pending: most jobs waiting or running; more are refused (HTTP 429).
        keep_finished: most finished jobs kept (pages and pictures); the oldest go first.
    """

    def __init__(self, explainer: StudyExplainer, max_pending: int = 16, keep_finished: int = 20) -> None:
        if keep_finished < 1:
            raise ValueError(f"keep_finished must be at least 1, not {keep_finished}")
        self.explainer = explainer
        self.max_pending = max_pending
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsna-cspine-job")

    def submit(
        self,
        study: str,
        folder: Path,
        out_dir: Path,
        job_id: str | None = None,
        root: Path | None = None,
        scratch: Path | None = None,
    ) -> Job:
        """Queue one study.

        Args:
            study: display name.
            folder: its DICOM folder.
            out_dir: where its pictures go.
            job_id: id to use (default a fresh random one).
            root: the job's own folder, removed with the job (and when it fails).
            scratch: files to delete as soon as the job finishes (an uploaded study).

        Raises:
            UploadRejected: ``max_pending`` jobs are already waiting (status 429).
        """
        with self._lock:
            self._refuse_when_full()
            job = Job(id=job_id or uuid.uuid4().hex, study=study, folder=folder, out_dir=out_dir, root=root, scratch=scratch)
            self.jobs[job.id] = job
        self._executor.submit(self._run, job)
        return job

    def check_room(self) -> None:
        """Refuse (429) when ``max_pending`` jobs are waiting: called before an upload is received, too."""
        with self._lock:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:
        pending = sum(not job.finished for job in self.jobs.values())
        if pending >= self.max_pending:
            raise UploadRejected(f"{pending} studies are already waiting; try again later", status=429)

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        job.state, job.message = "running", "starting"

        def progress(message: str, fraction: float) -> None:
            job.message, job.fraction = message, max(job.fraction, min(fraction, 1.0))

        try:
            explanation = self.explainer.explain(job.folder, job.out_dir, progress=progress)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the page must say so instead of spinning
            logger.exception("job %s (%s) failed", job.id, job.study)
            reason = str(exc) if isinstance(exc, CSpineError) else f"{exc.__class__.__name__}: {exc}"
            # Files first, state last: a client that sees the job finished never finds its study on disk.
            self._delete_files(job, failed=True)
            job.error = job.redact(reason)
            job.state, job.message = "failed", "failed"
        else:
            self._delete_files(job, failed=False)
            job.explanation = explanation
            job.state, job.message, job.fraction = "done", "done", 1.0
        finally:
            job.seconds = time.perf_counter() - start
            if not job.finished:  # interrupted (KeyboardInterrupt, shutdown): nothing of it is kept
                self._delete_files(job, failed=True)
            self._drop_oldest()

    @staticmethod
    def _delete_files(job: Job, failed: bool) -> None:
        """Delete what a finished job no longer needs: its study always, its whole folder when it failed."""
        if job.scratch is not None:
            shutil.rmtree(job.scratch, ignore_errors=True)
        if failed and job.root is not None:
            shutil.rmtree(job.root, ignore_errors=True)

    def _drop_oldest(self) -> None:
        """Remove the oldest finished jobs beyond the bound (their folders too)."""
        with self._lock:
            finished = sorted((j for j in self.jobs.values() if j.finished), key=lambda j: j.created)
            dropped = finished[: max(len(finished) - self.keep_finished, 0)]
            for old in dropped:
                del self.jobs[old.id]
        for old in dropped:
            if old.root is not None:
                shutil.rmtree(old.root, ignore_errors=True)
            logger.info("job %s (%s) removed: more than %d finished jobs", old.id, old.study, self.keep_finished)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def recent(self, n: int = 10) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)[:n]

    def shutdown(self) -> None:
        """Let the running job finish, drop the queued ones and delete every job's folder."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            for folder in (job.scratch, job.root):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)

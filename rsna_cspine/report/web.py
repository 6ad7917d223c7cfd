"""``rsna-cspine serve``: a local web page that scores one study and shows why.

The user uploads a study (a zip of its DICOM files) or picks a study folder under ``--studies-dir``;
a background thread runs :class:`~rsna_cspine.report.explain.StudyExplainer` on it while the page polls
its progress, then shows the seven vertebra probabilities, patient_overall, the overlays and Grad-CAM
pictures. The server binds 127.0.0.1 only: studies are patient data and never leave the machine.

Routes: ``GET /`` (upload form, study folders, recent jobs), ``POST /jobs/upload`` (multipart field
``file``), ``POST /jobs/folder`` (form field ``study``), ``GET /jobs/{id}`` (progress, then result),
``GET /jobs/{id}/files/{name}`` (the job's pictures), ``GET /api/jobs/{id}`` (JSON status and result).
A form post is answered with a redirect to the job page, a client asking for JSON with the job itself.
Uploads are checked and unpacked by :mod:`rsna_cspine.report.uploads`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from matplotlib.colors import to_hex
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import CSpineError
from rsna_cspine.report.explain import StudyExplainer, StudyExplanation
from rsna_cspine.report.pictures import LABEL_COLOURS, PICTURES
from rsna_cspine.report.uploads import COPY_CHUNK, UploadRejected, extract_study_zip, list_studies

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One study being (or having been) analysed.

    Attributes:
        id: random hex id (also the job's folder name).
        study: what the user sees as the study's name.
        folder: the study's DICOM folder.
        out_dir: where the pictures go.
        state: ``queued``, ``running``, ``done`` or ``failed``.
        message: what is happening now (or the last stage reached).
        fraction: share of the work done, 0..1.
        error: why it failed.
        explanation: the result once done.
        seconds: run time once finished.
    """

    id: str
    study: str
    folder: Path
    out_dir: Path
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

    def files(self) -> dict[str, Path]:
        """Picture file name → path, for the pictures this job wrote (the only files it serves)."""
        if self.explanation is None:
            return {}
        paths = [self.explanation.overview, self.explanation.table]
        paths += [p for item in self.explanation.vertebrae for p in item.pictures.values()]
        return {p.name: p for p in paths}

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
            body["seconds"] = round(self.seconds, 3)
        return body


class JobQueue:
    """Runs jobs one at a time in a background thread (the models are not shared between threads).

    Args:
        explainer: the loaded models.
        max_pending: most jobs waiting or running; more are refused (HTTP 429).
    """

    def __init__(self, explainer: StudyExplainer, max_pending: int = 16) -> None:
        self.explainer = explainer
        self.max_pending = max_pending
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsna-cspine-job")

    def submit(self, study: str, folder: Path, out_dir: Path, job_id: str | None = None) -> Job:
        """Queue one study.

        Args:
            study: display name.
            folder: its DICOM folder.
            out_dir: where its pictures go.
            job_id: id to use (default a fresh random one).
        """
        with self._lock:
            pending = sum(job.state in ("queued", "running") for job in self.jobs.values())
            if pending >= self.max_pending:
                raise UploadRejected(f"{pending} studies are already waiting; try again later", status=429)
            job = Job(id=job_id or uuid.uuid4().hex, study=study, folder=folder, out_dir=out_dir)
            self.jobs[job.id] = job
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        job.state, job.message = "running", "starting"

        def progress(message: str, fraction: float) -> None:
            job.message, job.fraction = message, max(job.fraction, min(fraction, 1.0))

        try:
            job.explanation = self.explainer.explain(job.folder, job.out_dir, progress=progress)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the page must say so instead of spinning
            logger.exception("job %s (%s) failed", job.id, job.study)
            job.error = str(exc) if isinstance(exc, CSpineError) else f"{exc.__class__.__name__}: {exc}"
            job.state, job.message = "failed", "failed"
        else:
            job.state, job.message, job.fraction = "done", "done", 1.0
        job.seconds = time.perf_counter() - start

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def recent(self, n: int = 10) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)[:n]

    def shutdown(self) -> None:
        """Let the running job finish and drop the queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return TEMPLATES.TemplateResponse(request, "error.html", {"status": status, "message": message}, status_code=status)


def _result_context(job: Job) -> dict[str, Any]:
    """Table rows and picture lists of a finished job, for ``job.html``."""
    if job.explanation is None:
        return {}
    found = {item.vertebra: item.found for item in job.explanation.vertebrae}
    rows = []
    for target in TARGET_COLUMNS:
        value = job.explanation.probabilities[target]
        note = "" if found.get(target, True) else "not found: prior"
        colour = to_hex(LABEL_COLOURS[VERTEBRAE.index(target)]) if target in VERTEBRAE else "transparent"
        rows.append({"target": target, "value": value, "exact": repr(value), "note": note, "colour": colour})
    vertebrae = [
        {
            "vertebra": item.vertebra,
            "probability": item.probability,
            "found": item.found,
            "files": [(kind, item.pictures[kind].name) for kind in PICTURES if kind in item.pictures],
        }
        for item in job.explanation.vertebrae
    ]
    return {
        "rows": rows,
        "vertebrae": vertebrae,
        "overview": job.explanation.overview.name,
        "warnings": job.explanation.prediction.warnings,
    }


def create_app(
    explainer: StudyExplainer,
    studies_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    max_upload_mb: float = 2048.0,
) -> FastAPI:
    """The web application around one loaded explainer.

    Args:
        explainer: the loaded models (``StudyExplainer(FracturePipeline.from_models_dir(...))``).
        studies_dir: folder whose study folders the user may pick (None: upload only).
        work_dir: where uploads are unpacked and pictures written (default: a temporary folder
            removed when the server stops).
        max_upload_mb: largest upload, and largest unpacked study, in MB.
    """
    owned_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="rsna-cspine-serve-")) if work_dir is None else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    max_bytes = int(max_upload_mb * 2**20)
    queue = JobQueue(explainer)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()
        if owned_work_dir:
            shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(title="rsna-cspine viewer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.queue = queue
    app.state.work_dir = work

    def started(request: Request, job: Job) -> Response:
        if _wants_json(request):
            return JSONResponse(job.to_json(), status_code=201)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    @app.get("/")
    def index(request: Request) -> Response:
        context = {
            "studies": list(list_studies(studies_dir)),
            "studies_dir": None if studies_dir is None else str(studies_dir),
            "jobs": queue.recent(),
            "max_upload_mb": f"{max_upload_mb:g}",
        }
        return TEMPLATES.TemplateResponse(request, "index.html", context)

    @app.post("/jobs/upload")
    async def upload(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is None:
            return _error(request, 411, "the upload must state its size (Content-Length)")
        if not length.isdigit() or int(length) > max_bytes + 2**20:  # + room for the multipart envelope
            return _error(request, 413, f"upload too large: {int(length) / 2**20:.0f} MB, at most {max_upload_mb:g} MB"
                          if length.isdigit() else "invalid Content-Length")
        form = await request.form(max_files=1, max_fields=2)
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            return _error(request, 400, "no file uploaded (form field 'file')")
        job_id = uuid.uuid4().hex
        job_dir = work / job_id
        try:
            job_dir.mkdir(parents=True)
            zip_path = job_dir / "upload.zip"
            with zip_path.open("wb") as sink:
                shutil.copyfileobj(upload.file, sink, COPY_CHUNK)
            if zip_path.stat().st_size > max_bytes:
                raise UploadRejected(f"upload too large; at most {max_upload_mb:g} MB", status=413)
            folder = extract_study_zip(zip_path, job_dir / "study", max_bytes)
            zip_path.unlink()
            name = folder.name if folder != job_dir / "study" else Path(upload.filename).stem
            job = queue.submit(name, folder, job_dir / "pictures", job_id=job_id)
        except UploadRejected as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            return _error(request, exc.status, f"{upload.filename}: {exc.reason}")
        finally:
            await upload.close()
        logger.info("job %s: uploaded %s (%s)", job.id, upload.filename, name)
        return started(request, job)

    @app.post("/jobs/folder")
    async def from_folder(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=2)
        name = str(form.get("study", ""))
        # Only names from the listing are accepted: a typed path can never reach outside studies_dir.
        folder = list_studies(studies_dir).get(name)
        if folder is None:
            return _error(request, 404, f"no study folder named {name!r} under the studies folder")
        job_id = uuid.uuid4().hex
        try:
            job = queue.submit(name, folder, work / job_id / "pictures", job_id=job_id)
        except UploadRejected as exc:
            return _error(request, exc.status, exc.reason)
        logger.info("job %s: study folder %s", job.id, folder)
        return started(request, job)

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> Response:
        job = queue.get(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id!r}"}, status_code=404)
        return JSONResponse(job.to_json())

    @app.get("/jobs/{job_id}")
    def job_page(request: Request, job_id: str) -> Response:
        job = queue.get(job_id)
        if job is None:
            return _error(request, 404, f"no job {job_id!r} (jobs live as long as the server)")
        return TEMPLATES.TemplateResponse(request, "job.html", {"job": job, **_result_context(job)})

    @app.get("/jobs/{job_id}/files/{name}")
    def job_file(request: Request, job_id: str, name: str) -> Response:
        job = queue.get(job_id)
        path = None if job is None else job.files().get(name)
        if path is None or not path.is_file():
            return _error(request, 404, f"no file {name!r} for job {job_id!r}")
        return FileResponse(path)

    return app


def serve(
    models_dir: str | Path | None,
    studies_dir: str | Path | None = None,
    port: int = 8765,
    work_dir: str | Path | None = None,
    device: str = "auto",
    max_upload_mb: float = 2048.0,
    twod_checkpoint: str | Path | None = None,
) -> None:
    """Load the models and serve the viewer on ``http://127.0.0.1:<port>/`` until interrupted.

    Args:
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints (as for ``rsna-cspine predict``).
        studies_dir: folder of study folders offered for picking.
        port: TCP port on 127.0.0.1.
        work_dir: where uploads and pictures go (default: a temporary folder).
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        max_upload_mb: largest upload in MB.
        twod_checkpoint: a ``train-2d`` checkpoint for the 2D tab (:mod:`rsna_cspine.report.web2d`); alone
            (``models_dir`` None) the viewer shows that tab only.
    """
    import uvicorn

    from rsna_cspine.inference import FracturePipeline, PipelineConfig
    from rsna_cspine.report.web2d import create_twod_app, mount_twod
    from rsna_cspine.twod.predict import load_image_classifier

    twod = load_image_classifier(twod_checkpoint, device) if twod_checkpoint else None
    if models_dir is None:
        if twod is None:
            raise CSpineError("serve needs --models, --twod-checkpoint or both")
        app = create_twod_app(twod, work_dir)
    else:
        pipeline = FracturePipeline.from_models_dir(models_dir, PipelineConfig(device=device))
        app = create_app(StudyExplainer(pipeline), studies_dir, work_dir, max_upload_mb)
        if twod is not None:
            mount_twod(app, twod)
    logger.info("serving on http://%s:%d/", HOST, port)
    uvicorn.run(app, host=HOST, port=port, log_level="info")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``serve`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--models", type=Path, default=None, help="models folder (seg/ and cls/ checkpoints)")
    parser.add_argument("--twod-checkpoint", type=Path, default=None,
                        help="train-2d best.pt for the 2D image tab (alone: the 2D tab only)")
    parser.add_argument("--studies-dir", type=Path, default=None, help="folder of study folders to pick from")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    parser.add_argument("--work-dir", type=Path, default=None, help="uploads and pictures (default: a temp folder)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:k] (default auto)")
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload in MB (default 2048)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 after a clean stop, 1 when the models cannot be loaded (the reason is logged).
    """
    try:
        serve(args.models, args.studies_dir, args.port, args.work_dir, args.device, args.max_upload_mb,
              args.twod_checkpoint)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    return 0

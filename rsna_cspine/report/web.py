"""``rsna-cspine serve``: a local web page that scores one study and shows why.

The user uploads a study (a zip of its DICOM files) or picks a study folder under ``--studies-dir``;
a background thread runs :class:`~rsna_cspine.report.explain.StudyExplainer` on it while the page polls
its progress, then shows the seven vertebra probabilities, patient_overall, the overlays and Grad-CAM
pictures. The server binds 127.0.0.1 only: studies are patient data and never leave the machine.

Routes: ``GET /`` (upload form, study folders, recent jobs), ``POST /jobs/upload`` (multipart fields
``token`` then ``file``), ``POST /jobs/folder`` (form fields ``token`` and ``study``), ``GET /jobs/{id}``
(progress, then result), ``GET /jobs/{id}/files/{name}`` (the job's pictures), ``GET /api/jobs/{id}``
(JSON status and result). A form post is answered with a redirect to the job page, a client asking for
JSON with the job itself. Every post carries the per-process form token (``app.state.token``; the page's
forms hold it), so that only the viewer's own pages can start jobs.

Safety: :class:`~rsna_cspine.report.guard.RequestGuard` refuses foreign Host headers and cross-site
requests and sets the security headers; uploads are received and unpacked within bounds by
:mod:`rsna_cspine.report.uploads`, with all disk work off the event loop; what stays on disk and for
how long is decided by :mod:`rsna_cspine.report.jobs`.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from matplotlib.colors import to_hex
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import CSpineError
from rsna_cspine.io.volume import study_name
from rsna_cspine.report.explain import StudyExplainer
from rsna_cspine.report.guard import RequestGuard
from rsna_cspine.report.jobs import Job, JobQueue, make_job_folder, remove_leftover_jobs
from rsna_cspine.report.pages import TEMPLATES, error_response, wants_json
from rsna_cspine.report.pictures import LABEL_COLOURS, PICTURES
from rsna_cspine.report.receive import receive_upload
from rsna_cspine.report.uploads import (
    UploadLimits,
    UploadRejected,
    accepted_kinds,
    accepted_types,
    list_studies,
    short,
    unpack_upload,
)

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: The form field that carries the per-process token.
TOKEN_FIELD = "token"
#: Largest body of the study-folder form (a token and a folder name).
_MAX_FORM_BYTES = 16 * 2**10

__all__ = ["HOST", "Job", "JobQueue", "add_arguments", "create_app", "run", "serve"]


# ----------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------


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
            "missing": [(kind, item.missing[kind]) for kind in PICTURES if kind in item.missing],
        }
        for item in job.explanation.vertebrae
    ]
    overview = job.explanation.overview
    return {
        "rows": rows,
        "vertebrae": vertebrae,
        "overview": None if overview is None else overview.name,
        "overview_missing": job.explanation.missing.get("overview", ""),
        "warnings": job.explanation.prediction.warnings,
    }


def create_app(
    explainer: StudyExplainer,
    studies_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    max_upload_mb: float = 2048.0,
    max_unpacked_mb: float = 3072.0,
    keep_jobs: int = 20,
) -> FastAPI:
    """The web application around one loaded explainer.

    Args:
        explainer: the loaded models (``StudyExplainer(FracturePipeline.from_models_dir(...))``).
        studies_dir: folder whose study folders the user may pick (None: upload only).
        work_dir: where uploads are received and unpacked and pictures written (default: a temporary
            folder removed when the server stops). Job folders an earlier run left there are removed.
        max_upload_mb: largest upload in MB.
        max_unpacked_mb: largest unpacked study in MB (zip members may also grow at most
            ``UploadLimits.max_ratio`` times).
        keep_jobs: most finished jobs kept, with their pictures; the oldest are removed first.
    """
    owned_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="rsna-cspine-serve-")) if work_dir is None else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    remove_leftover_jobs(work)
    limits = UploadLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_unpacked_bytes=int(max_unpacked_mb * 2**20))
    queue = JobQueue(explainer, keep_finished=keep_jobs)
    token = secrets.token_urlsafe(32)

    def check_token(fields: dict[str, str]) -> None:
        if not secrets.compare_digest(fields.get(TOKEN_FIELD, "").encode(), token.encode()):
            raise UploadRejected("the form token is missing or out of date: reload the viewer's page and try again", status=403)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_in_threadpool(queue.shutdown)
        if owned_work_dir:
            shutil.rmtree(work, ignore_errors=True)

    # No API documentation: the routes are for the viewer's own pages.
    app = FastAPI(title="rsna-cspine viewer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, refuse=error_response)
    app.state.queue = queue
    app.state.work_dir = work
    app.state.token = token

    def started(request: Request, job: Job) -> Response:
        if wants_json(request):
            return JSONResponse(job.to_json(), status_code=201)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    @app.get("/")
    def index(request: Request) -> Response:
        context = {
            "studies": list(list_studies(studies_dir)),
            "studies_dir": None if studies_dir is None else str(studies_dir),
            "jobs": queue.recent(),
            "max_upload_mb": f"{max_upload_mb:g}",
            "accept": accepted_types(),
            "kinds": accepted_kinds(),
            "token": token,
        }
        return TEMPLATES.TemplateResponse(request, "index.html", context)

    @app.post("/jobs/upload")
    async def upload(request: Request) -> Response:
        job_id = uuid.uuid4().hex
        job_dir = work / job_id
        filename = ""
        try:
            queue.check_room()  # before the bytes arrive, not after
            await run_in_threadpool(make_job_folder, job_dir)
            received = await receive_upload(request, job_dir / "upload", limits.max_upload_bytes, check_token)
            filename = received.filename
            folder = await run_in_threadpool(unpack_upload, received.path, job_dir / "study", limits)
            await run_in_threadpool(received.path.unlink, True)  # missing_ok: a NIfTI upload was moved into the study
            if folder.is_file():  # a NIfTI upload is the study itself
                name = study_name(filename) or "upload"
            else:
                name = folder.name if folder != job_dir / "study" else Path(filename).stem or "upload"
            job = queue.submit(name, folder, job_dir / "pictures", job_id=job_id, root=job_dir, scratch=job_dir / "study")
        except UploadRejected as exc:
            await run_in_threadpool(shutil.rmtree, job_dir, True)
            return error_response(request, exc.status, f"{short(filename, 80)}: {exc.reason}" if filename else exc.reason)
        except ClientDisconnect:
            await run_in_threadpool(shutil.rmtree, job_dir, True)
            logger.info("upload %s: the client went away before the upload was complete", job_id)
            return Response(status_code=400)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)  # also on cancellation: no await here
            logger.exception("upload %s failed", job_id)
            raise
        logger.info("job %s: uploaded %r (%s)", job.id, filename, name)
        return started(request, job)

    @app.post("/jobs/folder")
    async def from_folder(request: Request) -> Response:
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > _MAX_FORM_BYTES:
            return error_response(request, 413 if length.isdigit() else 411, "the study form must be small and state its size")
        form = await request.form(max_files=0, max_fields=3)
        try:
            check_token({key: str(value) for key, value in form.items()})
        except UploadRejected as exc:
            return error_response(request, exc.status, exc.reason)
        name = str(form.get("study", ""))
        # Only names from the listing are accepted: a typed path can never reach outside studies_dir.
        folder = list_studies(studies_dir).get(name)
        if folder is None:
            return error_response(request, 404, f"no study folder named {name!r} under the studies folder")
        job_id = uuid.uuid4().hex
        try:
            root = await run_in_threadpool(make_job_folder, work / job_id)
            job = queue.submit(name, folder, root / "pictures", job_id=job_id, root=root)
        except UploadRejected as exc:
            await run_in_threadpool(shutil.rmtree, work / job_id, True)
            return error_response(request, exc.status, exc.reason)
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
            return error_response(request, 404, f"no job {job_id!r} (the viewer keeps the latest {keep_jobs} finished jobs)")
        return TEMPLATES.TemplateResponse(request, "job.html", {"job": job, **_result_context(job)})

    @app.get("/jobs/{job_id}/files/{name}")
    def job_file(request: Request, job_id: str, name: str) -> Response:
        job = queue.get(job_id)
        path = None if job is None else job.files().get(name)
        if path is None or not path.is_file():
            return error_response(request, 404, f"no file {name!r} for job {job_id!r}")
        return FileResponse(path)

    return app


def serve(
    models_dir: str | Path | None,
    studies_dir: str | Path | None = None,
    port: int = 8765,
    work_dir: str | Path | None = None,
    device: str = "auto",
    max_upload_mb: float = 2048.0,
    max_unpacked_mb: float = 3072.0,
    keep_jobs: int = 20,
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
        max_unpacked_mb: largest unpacked study in MB.
        keep_jobs: most finished jobs kept with their pictures.
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
        app = create_app(StudyExplainer(pipeline), studies_dir, work_dir, max_upload_mb, max_unpacked_mb, keep_jobs)
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
    parser.add_argument("--max-unpacked-mb", type=float, default=3072.0,
                        help="largest unpacked study in MB (default 3072); zip members may grow at most 100 times")
    parser.add_argument("--keep-jobs", type=int, default=20,
                        help="finished jobs kept with their pictures; the oldest are removed (default 20)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 after a clean stop, 1 when the models cannot be loaded (the reason is logged).
    """
    try:
        serve(args.models, args.studies_dir, args.port, args.work_dir, args.device, args.max_upload_mb,
              args.max_unpacked_mb, args.keep_jobs, args.twod_checkpoint)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    return 0

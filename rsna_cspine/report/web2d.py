"""The viewer's 2D tab: upload one radiograph or sagittal slice (PNG, JPEG or DICOM) and get a ``train-2d``
classifier's class probabilities, its Grad-CAM and its vanilla-gradient saliency map.

Routes (mounted into the viewer by :func:`mount_twod`, or served alone by :func:`create_twod_app`):
``GET /2d`` (upload form and recent results), ``POST /2d/upload`` (multipart fields ``token`` and ``file``),
``GET /2d/results/{id}`` (the result page; JSON when asked for it), ``GET /2d/results/{id}/files/{name}``
(its two pictures). The CT viewer's rules hold, by the same code: :class:`~rsna_cspine.report.guard.RequestGuard`
answers only the local host and the viewer's own pages and sets the security headers; every post carries the
per-process form token (``app.state.token``, shared with the viewer's forms), checked before a byte of the file
is kept; :func:`~rsna_cspine.report.receive.receive_upload` bounds the body's size before and while it is read;
the image's pixel count is bounded before it is decoded (no decompression bomb); files are written only inside
the tab's work folder, the upload is deleted once analysed and only the latest ``keep_results`` results are
kept; decoding and the network run in a worker thread, one image at a time, so the event loop stays free.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from rsna_cspine.errors import CSpineError
from rsna_cspine.report.guard import RequestGuard
from rsna_cspine.report.receive import receive_upload
from rsna_cspine.report.pages import TEMPLATES, error_response, wants_json
from rsna_cspine.report.uploads import UploadRejected, short
from rsna_cspine.twod.gradcam import save_cam_overlay
from rsna_cspine.twod.predict import ImagePredictor
from rsna_cspine.twod.saliency import save_saliency_overlay

logger = logging.getLogger(__name__)

#: File types the tab accepts (by suffix; the content is checked when decoded).
ACCEPTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
#: Largest image, in pixels, decoded (a 12-bit chest radiograph is ~4300 × 3500 = 15 MP).
MAX_PIXELS = 40_000_000
TOKEN_FIELD = "token"


@dataclass
class TwoDResult:
    """One analysed image.

    Attributes:
        id: random hex id (its folder's name).
        name: the uploaded file's name as the browser gave it (shown, never used as a path).
        probabilities: class → probability, in the model's order.
        predicted: the most probable class.
        files: picture name → path (the only files served for this result).
        seconds: time taken.
        note: why a picture is missing (Grad-CAM needs a convolutional feature stage), or empty.
    """

    id: str
    name: str
    probabilities: dict[str, float]
    predicted: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "probabilities": self.probabilities, "predicted": self.predicted,
                "files": {n: f"/2d/results/{self.id}/files/{n}" for n in self.files}, "seconds": round(self.seconds, 3),
                "note": self.note}


def check_image_bounds(path: Path, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a file whose declared size exceeds ``max_pixels`` before any pixel is decoded.

    Raises:
        UploadRejected: not an image of an accepted type, unreadable header, or too many pixels (413).
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".dcm", ".dicom"):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            rows, columns = int(header.get("Rows", 0)), int(header.get("Columns", 0))
            frames = int(header.get("NumberOfFrames", 1) or 1)
            if rows * columns == 0:
                raise UploadRejected("the DICOM file holds no image (no Rows / Columns)")
            pixels = rows * columns * frames
        else:
            with Image.open(path) as image:  # reads the header only
                pixels = image.width * image.height
    except UploadRejected:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses to even open it
        raise UploadRejected(f"image too large to decode ({exc})", status=413) from exc
    except (OSError, UnidentifiedImageError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        raise UploadRejected(f"not a readable {suffix or 'image'} file ({exc.__class__.__name__})") from exc
    if pixels > max_pixels:
        raise UploadRejected(f"image of {pixels / 1e6:.0f} megapixels; at most {max_pixels / 1e6:.0f} are accepted",
                             status=413)


class TwoDTab:
    """The tab's state: the classifier, its work folder and the latest results.

    Args:
        predictor: a loaded ``train-2d`` classifier (:func:`rsna_cspine.twod.predict.load_image_classifier`).
        work_dir: where uploads and pictures go.
        max_upload_mb: largest upload in MB.
        keep_results: results kept (older ones and their files are deleted).
    """

    def __init__(self, predictor: ImagePredictor, work_dir: Path, max_upload_mb: float = 64.0,
                 keep_results: int = 32) -> None:
        self.predictor, self.work_dir = predictor, Path(work_dir)
        self.max_bytes = int(max_upload_mb * 2**20)
        self.keep_results = keep_results
        self.results: OrderedDict[str, TwoDResult] = OrderedDict()
        self._lock = threading.Lock()  # one image at a time: the model is not shared between threads

    def analyse(self, upload: Path, name: str, folder: Path) -> TwoDResult:
        """Classify one uploaded file and draw its pictures (runs in a worker thread).

        Raises:
            UploadRejected: the file is too large, of an unaccepted type or not a readable image.
        """
        start = time.perf_counter()
        check_image_bounds(upload)
        with self._lock:
            try:
                pixels = self.predictor.load(upload)
            except CSpineError as exc:
                raise UploadRejected(f"cannot read the image: {exc.reason}") from exc
            probs = self.predictor.probabilities(pixels)
            cam, saliency = self.predictor.explain(pixels)
        upload.unlink(missing_ok=True)
        classes = self.predictor.classes
        files = {"saliency.png": save_saliency_overlay(pixels, saliency, classes, folder / "saliency.png")}
        if cam is not None:
            files["gradcam.png"] = save_cam_overlay(pixels, cam, classes, folder / "gradcam.png")
        result = TwoDResult(
            id=folder.name, name=name, probabilities=probs, predicted=max(probs, key=probs.get), files=files,
            seconds=time.perf_counter() - start,
            note="" if cam is not None else "no Grad-CAM: the backbone lists no convolutional feature stage",
        )
        with self._lock:
            self.results[result.id] = result
            while len(self.results) > self.keep_results:
                old, _ = self.results.popitem(last=False)
                shutil.rmtree(self.work_dir / old, ignore_errors=True)
        return result


def mount_twod(app: FastAPI, predictor: ImagePredictor, work_dir: str | Path | None = None,
               max_upload_mb: float = 64.0, keep_results: int = 32) -> TwoDTab:
    """Add the 2D tab's routes to ``app`` (the CT viewer's, or :func:`create_twod_app`'s).

    Args:
        app: the application.
        predictor: the loaded 2D classifier.
        work_dir: where uploads and pictures go (default: ``app.state.work_dir / "2d"``, else a new temporary
            folder).
        max_upload_mb: largest upload in MB.
        keep_results: results kept.

    Returns:
        The tab (also ``app.state.twod``).
    """
    base = work_dir if work_dir is not None else getattr(app.state, "work_dir", None)
    work = Path(base) / "2d" if base is not None else Path(tempfile.mkdtemp(prefix="rsna-cspine-2d-"))
    work.mkdir(parents=True, exist_ok=True)
    tab = TwoDTab(predictor, work, max_upload_mb, keep_results)
    if not getattr(app.state, "token", None):
        app.state.token = secrets.token_urlsafe(32)
    app.state.twod = tab

    def page(request: Request, result: TwoDResult | None = None) -> Response:
        context = {"token": app.state.token, "classes": predictor.classes, "result": result,
                   "results": list(reversed(tab.results.values()))[:10], "max_upload_mb": f"{max_upload_mb:g}",
                   "accepted": ",".join(ACCEPTED_SUFFIXES), "backbone": predictor.cfg.model.backbone}
        return TEMPLATES.TemplateResponse(request, "twod.html", context)

    @app.get("/2d")
    def twod_index(request: Request) -> Response:
        return page(request)

    @app.post("/2d/upload")
    async def twod_upload(request: Request) -> Response:
        def check_token(fields: dict[str, str]) -> None:
            if not secrets.compare_digest(fields.get(TOKEN_FIELD, "").encode(), app.state.token.encode()):
                raise UploadRejected("the form token is missing or out of date: reload the page and try again", 403)

        folder = work / uuid.uuid4().hex
        filename = ""
        try:
            await run_in_threadpool(folder.mkdir)
            received = await receive_upload(request, folder / "upload", tab.max_bytes, check_token)
            filename = received.filename
            suffix = Path(filename).suffix.lower()
            if suffix not in ACCEPTED_SUFFIXES:
                raise UploadRejected(f"accepted types are {', '.join(ACCEPTED_SUFFIXES)}", 415)
            target = received.path.with_name(f"upload{suffix}")  # the decoders go by the suffix
            await run_in_threadpool(received.path.rename, target)
            result = await run_in_threadpool(tab.analyse, target, filename, folder)
        except UploadRejected as exc:
            await run_in_threadpool(shutil.rmtree, folder, True)
            return error_response(request, exc.status, f"{short(filename, 80)}: {exc.reason}" if filename else exc.reason)
        except ClientDisconnect:
            await run_in_threadpool(shutil.rmtree, folder, True)
            return Response(status_code=400)
        except BaseException:
            await run_in_threadpool(shutil.rmtree, folder, True)
            raise
        logger.info("2D result %s: %s → %s", result.id, result.name, result.predicted)
        if wants_json(request):
            return JSONResponse(result.to_json(), status_code=201)
        return RedirectResponse(f"/2d/results/{result.id}", status_code=303)

    @app.get("/2d/results/{result_id}")
    def twod_result(request: Request, result_id: str) -> Response:
        result = tab.results.get(result_id)
        if result is None:
            return error_response(request, 404, f"no 2D result {result_id!r} (only the latest {keep_results} are kept)")
        return JSONResponse(result.to_json()) if wants_json(request) else page(request, result)

    @app.get("/2d/results/{result_id}/files/{name}")
    def twod_file(request: Request, result_id: str, name: str) -> Response:
        result = tab.results.get(result_id)
        path = None if result is None else result.files.get(name)
        if path is None or not path.is_file():
            return error_response(request, 404, f"no file {name!r} for 2D result {result_id!r}")
        return FileResponse(path)

    return tab


def create_twod_app(predictor: ImagePredictor, work_dir: str | Path | None = None, max_upload_mb: float = 64.0,
                    keep_results: int = 32) -> FastAPI:
    """A viewer with the 2D tab only (``rsna-cspine serve --twod-checkpoint PT`` without ``--models``).

    Args:
        predictor: the loaded 2D classifier.
        work_dir: where uploads and pictures go (default: a temporary folder removed when the server stops).
        max_upload_mb: largest upload in MB.
        keep_results: results kept.
    """
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="rsna-cspine-2d-")) if owned else Path(work_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if owned:
            shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(title="rsna-cspine 2D viewer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, refuse=error_response)
    app.state.work_dir = work
    mount_twod(app, predictor, max_upload_mb=max_upload_mb, keep_results=keep_results)

    @app.get("/")
    def home() -> Response:
        return RedirectResponse("/2d", status_code=307)

    return app

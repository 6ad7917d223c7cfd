"""The viewer's 2D tab: an uploaded PNG or DICOM gets the checkpoint's class probabilities (the same numbers
as ``ImagePredictor``), its Grad-CAM and saliency pictures; foreign hosts, other origins, missing tokens,
wrong types, oversized bodies and decompression bombs are refused; old results are cleaned up."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from rsna_cspine.cli import main as cli_main
from rsna_cspine.report.web2d import create_twod_app
from rsna_cspine.twod.predict import ImagePredictor, load_image_classifier

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
LOCAL = "http://127.0.0.1:8765"
JSON = {"accept": "application/json"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web2d") / "xr"
    assert cli_main(["synth-2d", str(out), "--per-class", "8", "--seed", "2", "--size", "48", "--dicom", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def predictor(images: Path, tmp_path_factory) -> ImagePredictor:
    run = tmp_path_factory.mktemp("web2d") / "run"
    assert cli_main(["train-2d", "--config", str(REPO / "configs" / "twod_cpu.yaml"), "--data", str(images),
                     f"run_dir={run}", "data.image_size=48", "train.threads=1", "train.epochs=1"]) == 0
    return load_image_classifier(run / "best.pt", "cpu")


@pytest.fixture()
def client(predictor: ImagePredictor, tmp_path: Path):
    app = create_twod_app(predictor, work_dir=tmp_path / "work", max_upload_mb=1.0, keep_results=2)
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


def _token(client: TestClient) -> str:
    page = client.get("/2d")
    assert page.status_code == 200
    return re.search(r'name="token" value="([^"]+)"', page.text).group(1)


def _post(client: TestClient, name: str, content: bytes, token: str | None, headers: dict | None = None):
    data = {} if token is None else {"token": token}
    return client.post("/2d/upload", data=data, files={"file": (name, content)}, headers=headers or {},
                       follow_redirects=False)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` grey pixels and holds almost none."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_upload_gives_the_predictors_probabilities_and_both_maps(client, predictor, images) -> None:
    token = _token(client)
    png = next((images / "fracture").glob("*.png"))
    reply = _post(client, png.name, png.read_bytes(), token)
    assert reply.status_code == 303
    page = client.get(reply.headers["location"])
    assert page.status_code == 200 and 'id="tab-2d"' in page.text
    shown = {m.group(1): float(m.group(2)) for m in re.finditer(r'data-class="([^"]+)" data-value="([^"]+)"', page.text)}
    expected = predictor.probabilities(predictor.load(png))
    assert shown == pytest.approx(expected, abs=1e-9)
    for name in ("gradcam", "saliency"):
        src = re.search(rf'id="img2d-{name}" src="([^"]+)"', page.text).group(1)
        picture = client.get(src)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert len(picture.content) > 1000
    # JSON, and a DICOM file, take the same path.
    dicom = next((images / "normal").glob("*.dcm"))
    result = _post(client, dicom.name, dicom.read_bytes(), token, headers=JSON)
    assert result.status_code == 201
    body = result.json()
    assert body["probabilities"] == pytest.approx(predictor.probabilities(predictor.load(dicom)), abs=1e-9)
    assert set(body["files"]) == {"gradcam.png", "saliency.png"}
    assert client.get(f"/2d/results/{body['id']}", headers=JSON).json()["predicted"] == body["predicted"]
    upload_left = list((Path(client.app.state.twod.work_dir) / body["id"]).glob("upload*"))
    assert upload_left == []  # the upload itself is not kept


def test_refusals(client, images, predictor) -> None:
    token = _token(client)
    png = (next((images / "normal").glob("*.png"))).read_bytes()
    assert _post(client, "a.png", png, None, JSON).status_code == 403  # no form token
    assert _post(client, "a.png", png, "stale", JSON).status_code == 403
    cross = _post(client, "a.png", png, token, {"origin": "http://evil.example", **JSON})
    assert cross.status_code == 403 and "another site" in cross.json()["error"]
    assert _post(client, "a.png", png, token, {"sec-fetch-site": "cross-site", **JSON}).status_code == 403
    assert _post(client, "a.gif", png, token, JSON).status_code == 415
    assert _post(client, "a.png", b"not an image", token, JSON).status_code == 400
    too_big = _post(client, "a.png", b"\0" * (2 * 2**20), token, JSON)
    assert too_big.status_code == 413
    for width in (9000, 30000):  # over the tab's bound, and over Pillow's own
        bomb = _post(client, "bomb.png", _png_header(width, width), token, JSON)
        assert bomb.status_code == 413, bomb.text
    with TestClient(client.app, base_url="http://evil.example") as foreign:
        assert foreign.get("/2d").status_code == 400  # DNS rebinding: a foreign Host is not answered
    assert client.get("/2d/results/nothing", headers=JSON).status_code == 404
    headers = client.get("/2d").headers  # the viewer's guard answers for the tab too
    assert "script-src 'nonce-" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    ok = _post(client, "a.png", png, token, JSON).json()
    assert client.get(f"/2d/results/{ok['id']}/files/upload.png").status_code == 404  # only its pictures are served
    assert client.get(f"/2d/results/{ok['id']}/files/..%2F..%2Fconfig.yaml").status_code == 404
    # Nothing refused left a folder behind: the only result folder is the accepted one.
    work = Path(client.app.state.twod.work_dir)
    assert [p.name for p in work.iterdir()] == [ok["id"]]


def test_only_the_latest_results_are_kept(client, images) -> None:
    token = _token(client)
    png = next((images / "fracture").glob("*.png")).read_bytes()
    ids = [_post(client, "x.png", png, token, JSON).json()["id"] for _ in range(3)]
    work = Path(client.app.state.twod.work_dir)
    assert sorted(p.name for p in work.iterdir()) == sorted(ids[1:])
    assert client.get(f"/2d/results/{ids[0]}", headers=JSON).status_code == 404
    assert client.get(f"/2d/results/{ids[2]}", headers=JSON).status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/2d"


def test_serve_needs_models_or_a_2d_checkpoint(caplog) -> None:
    assert cli_main(["serve"]) == 1
    assert "--models, --twod-checkpoint or both" in caplog.text

"""The local study viewer: upload checks, jobs and progress, result page, and a real headless-Chromium run.

Models are the pipeline tests' tiny real networks; the study is a real DICOM series written with
pydicom. The probabilities on the page must be the ones ``FracturePipeline.predict_study`` gives for
the same folder.
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from matplotlib.image import imread

from rsna_cspine.constants import TARGET_COLUMNS
from rsna_cspine.inference import FracturePipeline, PipelineConfig
from rsna_cspine.report.explain import StudyExplainer
from rsna_cspine.report.uploads import UploadRejected, extract_study_zip, list_studies
from rsna_cspine.report.web import create_app
from tests.toy_pipeline import GOOD, make_tiny_dataset, make_tiny_models
from tests.web_e2e.browser import chromium, missing_browser, serve_in_thread

torch.set_num_threads(1)
JSON = {"accept": "application/json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), uids=GOOD[:2], broken=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> FracturePipeline:
    models = make_tiny_models(tmp_path_factory.mktemp("models"))
    return FracturePipeline.from_models_dir(models, PipelineConfig(device="cpu"))


@pytest.fixture(scope="module")
def explainer(pipeline: FracturePipeline) -> StudyExplainer:
    return StudyExplainer(pipeline)


@pytest.fixture()
def client(explainer: StudyExplainer, data: Path, tmp_path: Path):
    with TestClient(create_app(explainer, studies_dir=data, work_dir=tmp_path / "work")) as test_client:
        yield test_client


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _study_zip(folder: Path, prefix: str | None = None) -> bytes:
    prefix = folder.name if prefix is None else prefix
    return _zip({f"{prefix}/{f.name}" if prefix else f.name: f.read_bytes() for f in sorted(folder.iterdir())})


def _wait(client: TestClient, job_id: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def _page_probabilities(html: str) -> dict[str, float]:
    found = re.findall(r'id="prob-([A-Za-z0-9_]+)" data-value="([^"]+)"', html)
    return {target: float(value) for target, value in found}


# ----------------------------------------------------------------------------------------------
# Zip and folder checks (no server)
# ----------------------------------------------------------------------------------------------


def test_extract_finds_the_series_folder_and_drops_packaging_debris(tmp_path: Path) -> None:
    archive = tmp_path / "study.zip"
    archive.write_bytes(_zip({"uid/1.dcm": b"a", "uid/2.dcm": b"b", "__MACOSX/uid/._1.dcm": b"x", "uid/.DS_Store": b"x"}))
    folder = extract_study_zip(archive, tmp_path / "out", max_bytes=10_000)
    assert folder == tmp_path / "out" / "uid"
    assert sorted(p.name for p in folder.iterdir()) == ["1.dcm", "2.dcm"]
    flat = tmp_path / "flat.zip"
    flat.write_bytes(_zip({"1.dcm": b"a"}))
    assert extract_study_zip(flat, tmp_path / "flat", max_bytes=10_000) == tmp_path / "flat"


@pytest.mark.parametrize(
    "members, reason",
    [
        ({"../evil.dcm": b"x"}, "unsafe path"),
        ({"uid/../../evil.dcm": b"x"}, "unsafe path"),
        ({"/tmp/evil.dcm": b"x"}, "unsafe path"),
        ({"a/1.dcm": b"x", "b/1.dcm": b"x"}, "2 folders"),
        ({"uid/": b""}, "no files"),
        ({"uid/1.dcm": bytes(200_000)}, "unpacks to"),  # highly compressible: a tiny zip bomb
    ],
)
def test_extract_refuses_unsafe_or_ambiguous_zips(tmp_path: Path, members: dict[str, bytes], reason: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip(members))
    with pytest.raises(UploadRejected, match=reason):
        extract_study_zip(archive, tmp_path / "out" / "inner", max_bytes=100_000)
    assert not (tmp_path / "evil.dcm").exists() and not (tmp_path / "out" / "evil.dcm").exists()


def test_extract_refuses_links_and_non_zips(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("uid/1.dcm")
        link.external_attr = (0o120777 << 16)  # a symbolic link member
        archive.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UploadRejected, match="symbolic link"):
        extract_study_zip(tmp_path / "link.zip", tmp_path / "out", max_bytes=10_000)
    (tmp_path / "fake.zip").write_bytes(b"DICM" * 100)
    with pytest.raises(UploadRejected, match="not a zip"):
        extract_study_zip(tmp_path / "fake.zip", tmp_path / "out", max_bytes=10_000)


def test_study_folders_are_listed_one_or_two_levels_down(tmp_path: Path, data: Path) -> None:
    assert list(list_studies(data)) == [f"test_images/{uid}" for uid in sorted(GOOD[:2])]
    assert list(list_studies(data / "test_images")) == sorted(GOOD[:2])
    assert list_studies(None) == {} and list_studies(tmp_path / "absent") == {}


# ----------------------------------------------------------------------------------------------
# The API through TestClient
# ----------------------------------------------------------------------------------------------


def test_index_offers_upload_and_study_folders(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="study-zip"' in page.text and 'action="/jobs/upload"' in page.text
    for uid in GOOD[:2]:
        assert f"test_images/{uid}" in page.text


def test_upload_runs_the_study_and_shows_the_pipeline_probabilities(
    client: TestClient, pipeline: FracturePipeline, data: Path
) -> None:
    folder = data / "test_images" / GOOD[0]
    reply = client.post("/jobs/upload", files={"file": ("study.zip", _study_zip(folder), "application/zip")}, headers=JSON)
    assert reply.status_code == 201, reply.text
    job = _wait(client, reply.json()["id"])
    assert job["state"] == "done", job
    expected = pipeline.predict_study(folder).probs
    assert job["study"] == GOOD[0]
    assert [job["probabilities"][c] for c in TARGET_COLUMNS] == pytest.approx(expected.tolist(), abs=1e-9)

    page = client.get(f"/jobs/{job['id']}")
    shown = _page_probabilities(page.text)
    assert list(shown) == list(TARGET_COLUMNS)
    assert [shown[c] for c in TARGET_COLUMNS] == pytest.approx(expected.tolist(), abs=1e-9)
    images = re.findall(r'<img id="img-[^"]+" src="([^"]+)"', page.text)
    assert len(images) == len([name for name in job["files"] if name.endswith(".png")]) >= 8
    for src in images:
        picture = client.get(src)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert picture.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/jobs/{job['id']}/files/upload.zip").status_code == 404
    assert client.get(f"/jobs/{job['id']}/files/..%2F..%2Fstudy").status_code == 404
    assert client.get("/jobs/nope/files/overview.png").status_code == 404


def test_picking_a_folder_runs_it_and_later_studies_wait_with_progress(
    client: TestClient, pipeline: FracturePipeline, data: Path
) -> None:
    reply = client.post("/jobs/folder", data={"study": f"test_images/{GOOD[1]}"}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"].startswith("/jobs/")
    first_id = reply.headers["location"].rsplit("/", 1)[1]
    junk = _zip({"uid/1.dcm": b"not a dicom file" * 20, "uid/2.dcm": b"nor this one" * 20})
    second = client.post("/jobs/upload", files={"file": ("junk.zip", junk, "application/zip")}, headers=JSON).json()
    # One worker: the second study waits while the first runs, and its page shows the progress view.
    waiting = client.get(f"/jobs/{second['id']}")
    assert 'id="progress"' in waiting.text and "fetch(" in waiting.text
    assert client.get(f"/api/jobs/{second['id']}").json()["state"] in ("queued", "running")

    job = _wait(client, first_id)
    expected = pipeline.predict_study(data / "test_images" / GOOD[1]).probs
    assert job["state"] == "done" and job["study"] == f"test_images/{GOOD[1]}"
    assert [job["probabilities"][c] for c in TARGET_COLUMNS] == pytest.approx(expected.tolist(), abs=1e-9)
    # A study that cannot be loaded fails with the reason, on the API and on its page.
    failed = _wait(client, second["id"])
    assert failed["state"] == "failed" and "load failed" in failed["error"] and "DICOM" in failed["error"]
    page = client.get(f"/jobs/{second['id']}")
    assert 'id="error-message"' in page.text and "load failed" in page.text


def test_bad_requests_get_clear_messages(client: TestClient, explainer: StudyExplainer, tmp_path: Path) -> None:
    reply = client.post("/jobs/upload", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert reply.status_code == 400 and "not a zip file" in reply.text and 'id="error-message"' in reply.text
    evil = _zip({"../../evil.dcm": b"x"})
    reply = client.post("/jobs/upload", files={"file": ("evil.zip", evil, "application/zip")}, headers=JSON)
    assert reply.status_code == 400 and "unsafe path" in reply.json()["error"]
    assert client.post("/jobs/upload", data={"other": "x"}, headers=JSON).status_code == 400
    reply = client.post("/jobs/folder", data={"study": "../../etc"}, headers=JSON)
    assert reply.status_code == 404 and "no study folder" in reply.json()["error"]
    assert client.get("/jobs/0123").status_code == 404

    with TestClient(create_app(explainer, work_dir=tmp_path / "small", max_upload_mb=0.05)) as small:
        reply = small.post("/jobs/upload", files={"file": ("big.zip", bytes(2 * 2**20), "application/zip")}, headers=JSON)
        assert reply.status_code == 413 and "too large" in reply.json()["error"]
        bomb = _zip({"uid/1.dcm": bytes(10 * 2**20)})  # ~10 kB on the wire, 10 MB unpacked
        reply = small.post("/jobs/upload", files={"file": ("bomb.zip", bomb, "application/zip")}, headers=JSON)
        assert reply.status_code == 413 and "unpacks to" in reply.json()["error"]


# ----------------------------------------------------------------------------------------------
# End to end in headless Chromium
# ----------------------------------------------------------------------------------------------


def test_browser_upload_shows_probabilities_and_pictures(
    explainer: StudyExplainer, pipeline: FracturePipeline, data: Path, tmp_path: Path
) -> None:
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = data / "test_images" / GOOD[0]
    upload = tmp_path / "study.zip"
    upload.write_bytes(_study_zip(folder))
    app = create_app(explainer, studies_dir=data, work_dir=tmp_path / "work")
    with serve_in_thread(app) as base_url, chromium() as browser:
        browser.get(base_url + "/")
        browser.find_element(By.ID, "study-zip").send_keys(str(upload))
        browser.find_element(By.ID, "upload-button").click()
        WebDriverWait(browser, 30).until(lambda b: "/jobs/" in b.current_url)
        WebDriverWait(browser, 180, poll_frequency=0.3).until(
            lambda b: b.find_elements(By.ID, "probabilities") or b.find_elements(By.ID, "error-message")
        )
        assert not browser.find_elements(By.ID, "error-message"), browser.find_element(By.ID, "error-message").text
        shown = {c: browser.find_element(By.ID, f"prob-{c}") for c in TARGET_COLUMNS}
        values = [float(shown[c].get_attribute("data-value")) for c in TARGET_COLUMNS]
        expected = pipeline.predict_study(folder).probs
        assert values == pytest.approx(expected.tolist(), abs=1e-9)
        assert [float(shown[c].text) for c in TARGET_COLUMNS] == pytest.approx(expected.tolist(), abs=6e-5)
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        )
        assert browser.execute_script("return document.images.length") >= 8
        screenshot = tmp_path / "viewer.png"
        assert browser.save_screenshot(str(screenshot))
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert pixels.std() > 0.1  # text, table bars and pictures, not a blank page
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 200  # the overview picture's grey levels and label colours are on screen

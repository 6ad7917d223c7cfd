"""The viewer under test: a real uvicorn server on 127.0.0.1, an HTTP client holding the page's form token, zips."""

from __future__ import annotations

import io
import re
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.web_e2e.browser import serve_in_thread

JSON = {"accept": "application/json"}


@dataclass
class Viewer:
    """A running viewer: its client (base URL set), the page's form token, its app and work folder."""

    client: httpx.Client
    token: str
    app: object
    work: Path
    base_url: str

    def upload(self, content: bytes, name: str = "study.zip", token: str | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
        """POST a file to /jobs/upload the way the page's form does (token first), asking for JSON."""
        return self.client.post("/jobs/upload", data={"token": self.token if token is None else token},
                                files={"file": (name, content, "application/zip")}, headers={**JSON, **(headers or {})})

    def wait(self, job_id: str, timeout_s: float = 120.0) -> dict:
        """The job's JSON once it is done or failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")

    def files(self) -> list[Path]:
        """Every file under the work folder (the job markers left out)."""
        return sorted(p for p in self.work.rglob("*") if p.is_file() and p.name != ".rsna-cspine-job")


def page_token(client: httpx.Client) -> str:
    """The form token of the viewer's page (the hidden ``token`` field of its forms)."""
    found = re.search(r'name="token" value="([^"]+)"', client.get("/").text)
    assert found, "the page has no form token"
    return found.group(1)


@contextmanager
def running_viewer(app, work: Path) -> Iterator[Viewer]:
    """Serve ``app`` on a free 127.0.0.1 port; yields a :class:`Viewer` (the server stops on exit)."""
    with serve_in_thread(app) as base_url, httpx.Client(base_url=base_url, timeout=120.0) as client:
        yield Viewer(client, page_token(client), app, Path(work), base_url)


def make_zip(members: dict[str, bytes], level: int | None = None) -> bytes:
    """A deflated zip of ``name → content``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def study_zip(folder: Path, prefix: str | None = None) -> bytes:
    """A zip of a study folder's files, under ``prefix/`` (default the folder's name; "" for none)."""
    prefix = folder.name if prefix is None else prefix
    return make_zip({f"{prefix}/{f.name}" if prefix else f.name: f.read_bytes() for f in sorted(folder.iterdir())})


def repeated_member_zip(members: dict[str, tuple[bytes, int]], level: int = 1) -> bytes:
    """A zip whose members are ``block`` repeated ``times`` (streamed, so large members cost no memory)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, (block, times) in members.items():
            with archive.open(name, "w", force_zip64=len(block) * times > 2**31) as sink:
                for _ in range(times):
                    sink.write(block)
    return buffer.getvalue()


def renamed_member_zip(name: str, content: bytes = b"hello") -> bytes:
    """A zip with one member called ``name``, written as any zip tool would (zipfile refuses some names)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("placeholder")
        archive.writestr(info, content)
        info.filename = name  # the central directory is written on close, with this name
    data = buffer.getvalue()
    # The local header keeps the placeholder name; give it the same name so the archive is consistent.
    local = data.index(b"placeholder")
    encoded = name.encode("utf-8")
    header = bytearray(data[:local])
    header[26:28] = len(encoded).to_bytes(2, "little")
    rest = data[local + len(b"placeholder"):]
    shift = len(encoded) - len(b"placeholder")
    central = rest.index(b"PK\x01\x02")
    end = bytearray(rest[central:])
    eocd = end.rindex(b"PK\x05\x06")
    end[eocd + 16:eocd + 20] = (int.from_bytes(end[eocd + 16:eocd + 20], "little") + shift).to_bytes(4, "little")
    return bytes(header) + encoded + rest[:central] + bytes(end)

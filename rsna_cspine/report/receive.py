"""Receiving an upload: the multipart request body streamed into the job's folder, within bounds.

The file is written straight into the job's folder (never the system temporary folder), the form's
fields are checked before the first byte of the file is kept, and the size bound is enforced while the
bytes arrive. Parsing and disk writes run in Starlette's thread pool, so the event loop keeps answering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from rsna_cspine.report.uploads import COPY_CHUNK, UploadRejected, mb, short, shown

#: The form field that carries the study file.
FILE_FIELD = "file"
#: Room for the multipart envelope (boundaries, part headers, small fields) around the file.
_ENVELOPE = 1 << 16
#: Most small form fields, and the longest one, accepted before the file.
_MAX_FIELDS, _MAX_FIELD_BYTES = 8, 4096


@dataclass
class ReceivedUpload:
    """The uploaded file and the form fields sent before it.

    Attributes:
        path: the file as received, inside the job's folder.
        filename: the name the browser gave (shown to the user, never used as a path).
        fields: the other form fields.
    """

    path: Path
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _FormReader:
    """Callbacks for python-multipart's parser: small fields kept, the one file written to ``path``.

    Written here because Starlette's form parser spools files to the system temporary folder and reads the
    whole body before the fields can be checked; this one uses the same parser (python-multipart) and
    calls ``before_file(fields)`` when the file part starts, so a refused request writes nothing.
    """

    def __init__(self, path: Path, max_file_bytes: int, before_file: Callable[[dict[str, str]], None]) -> None:
        self.upload = ReceivedUpload(path)
        self.max_file_bytes = max_file_bytes
        self.before_file = before_file
        self.sink: BinaryIO | None = None
        self.file_bytes = 0
        self.file_done = False
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._field: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.upload.fields) >= _MAX_FIELDS:
                raise UploadRejected("too many form fields")
            self._field = name
            return
        if name != FILE_FIELD or self.sink is not None or self.file_done:
            raise UploadRejected(f"one file per upload, in the form field '{FILE_FIELD}'")
        self.before_file(self.upload.fields)
        self.upload.filename = PurePosixPath(options[b"filename"].decode("utf-8", "replace").replace("\\", "/")).name
        self.sink = self.upload.path.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is None:
            if len(self._value) + end - start > _MAX_FIELD_BYTES:
                raise UploadRejected(f"form field {shown(self._field or '')} is too long")
            self._value += data[start:end]
            return
        self.file_bytes += end - start
        if self.file_bytes > self.max_file_bytes:
            raise UploadRejected(f"upload too large: more than {mb(self.max_file_bytes)}", status=413)
        self.sink.write(data[start:end])

    def _part_end(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink, self.file_done = None, True
        elif self._field is not None:
            self.upload.fields[self._field] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


async def receive_upload(
    request: Request,
    path: Path,
    max_file_bytes: int,
    before_file: Callable[[dict[str, str]], None] = lambda fields: None,
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` request body and write its one file to ``path``.

    The parsing and the disk writes run in Starlette's thread pool, a chunk at a time, so the event loop
    keeps answering other requests while a large upload arrives.

    Args:
        request: the upload request.
        path: where the file goes (its folder exists).
        max_file_bytes: largest file; a larger one is refused (413) as soon as the bytes pass the bound.
        before_file: called with the fields received so far when the file part starts; raise
            :class:`UploadRejected` to refuse before any of the file is written (the form token check).

    Returns:
        The file's path, the name the browser gave and the fields.

    Raises:
        UploadRejected: no file, a malformed form, a refused field, or too many bytes (413).
    """
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_file_bytes + _ENVELOPE):
        if not length.isdigit():
            raise UploadRejected("invalid Content-Length")
        raise UploadRejected(f"upload too large: {mb(int(length))}, at most {mb(max_file_bytes)}", status=413)
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadRejected(f"the upload must be a multipart form with the study in the field '{FILE_FIELD}'")
    reader = _FormReader(path, max_file_bytes, before_file)
    try:
        parser = MultipartParser(options[b"boundary"], reader.callbacks())
        pending, received = bytearray(), 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_file_bytes + _ENVELOPE:
                raise UploadRejected(f"upload too large: more than {mb(max_file_bytes)}", status=413)
            pending += chunk
            if len(pending) >= COPY_CHUNK:  # the parser and the disk get whole chunks, not 64 kB pieces
                await run_in_threadpool(parser.write, bytes(pending))
                pending.clear()
        await run_in_threadpool(parser.write, bytes(pending))
        parser.finalize()
    except FormParserError as exc:
        raise UploadRejected(f"malformed multipart form ({short(str(exc))})") from exc
    finally:
        reader.close()
    if not reader.file_done or not reader.upload.filename:  # a form sent with no file chosen has an empty name
        raise UploadRejected(f"no file uploaded (form field '{FILE_FIELD}')")
    return reader.upload

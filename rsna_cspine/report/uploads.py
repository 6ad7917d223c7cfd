"""Studies the viewer accepts: an uploaded file unpacked within bounds, or a listed folder or NIfTI file.

An upload is received into the job's folder by :func:`rsna_cspine.report.receive.receive_upload`, then
:func:`unpack_upload` recognises the file by its content and hands it to its :class:`UploadKind`'s
unpacker, which writes the study. Two kinds exist: a zip of one study's DICOM files
(:func:`extract_study_zip`) and a NIfTI CT (:func:`keep_nifti`, a study in one file); another kind is one
more entry in :data:`UPLOAD_KINDS`.

Any refusal is an :class:`UploadRejected` with the HTTP status to answer and a reason that names the
problem (a zip member, a limit) but never a path on the server.
"""

from __future__ import annotations

import errno
import gzip
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rsna_cspine.errors import CSpineError

#: Zip members that are packaging debris, never slices (macOS resource forks, Finder/Explorer files).
_DEBRIS = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
#: Bytes copied at a time (uploads and zip members): the most a bound can be overrun by.
COPY_CHUNK = 1 << 20
#: Longest path component most file systems take (NAME_MAX), and longest member path accepted.
_NAME_MAX, _PATH_MAX = 255, 1024
#: Errors of the file system that mean the server, not the archive, is at fault.
_SERVER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class UploadRejected(CSpineError):
    """An upload or a study choice the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, path: str | Path | None = None) -> None:
        super().__init__(message, path)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload, each checked while the bytes arrive or unpack.

    Attributes:
        max_upload_bytes: largest uploaded file (default 2 GiB).
        max_unpacked_bytes: largest study once unpacked (default 3 GiB, a few times a large CT series).
        max_files: most files one upload may hold.
        max_ratio: most a zip member may grow when unpacked (unpacked / compressed size). DICOM slices
            deflate a few times at most; a zip bomb grows up to ~1000 times.
        ratio_free_bytes: members up to this size are exempt from ``max_ratio`` (a blank 1024² slice, 2 MiB,
            deflates ~1000 times and is harmless); the total bound still counts them.
    """

    max_upload_bytes: int = 2 * 2**30
    max_unpacked_bytes: int = 3 * 2**30
    max_files: int = 5000
    max_ratio: float = 100.0
    ratio_free_bytes: int = 4 * 2**20


def mb(n: float) -> str:
    """A byte count in MB, for messages (two significant digits below 10 MB)."""
    value = n / 2**20
    return f"{value:.0f} MB" if value >= 10 else f"{value:.2g} MB"


def short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (library messages may quote whole headers)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(name: str, limit: int = 80) -> str:
    """A user-given name for a message: quoted, control characters escaped, cut to ``limit`` characters."""
    return short(repr(name), limit)


# ----------------------------------------------------------------------------------------------
# Unpacking: the file → a study folder
# ----------------------------------------------------------------------------------------------


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, refused when it is empty, too long, or could land outside the folder."""
    name = info.filename.replace("\\", "/")
    if not name.strip("/"):
        raise UploadRejected("the zip holds a member with an empty name")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise UploadRejected(f"unsafe path in the zip: {shown(info.filename)} (absolute or with '..')")
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in path.parts)
    if longest > _NAME_MAX or len(name.encode("utf-8", "surrogateescape")) > _PATH_MAX:
        raise UploadRejected(f"name too long in the zip: {shown(info.filename)} ({len(name)} characters; "
                             f"at most {_NAME_MAX} bytes per folder or file name)")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadRejected(f"the zip holds a symbolic link: {shown(info.filename)}")
    return path


def _check_members(archive: zipfile.ZipFile, limits: UploadLimits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The members to unpack (debris dropped), after every check the central directory allows."""
    members = []
    for info in archive.infolist():
        path = _member_path(info)
        if info.is_dir() or any(part in _DEBRIS or part.startswith("._") for part in path.parts):
            continue
        if info.flag_bits & 0x1:
            raise UploadRejected(f"encrypted zip member {shown(info.filename)}: upload an unencrypted zip")
        members.append((info, path))
    if not members:
        raise UploadRejected("the zip holds no files")
    if len(members) > limits.max_files:
        raise UploadRejected(f"the zip holds {len(members)} files; at most {limits.max_files} are accepted", status=413)
    declared = sum(info.file_size for info, _ in members)
    if declared > limits.max_unpacked_bytes:
        raise UploadRejected(f"the zip unpacks to {mb(declared)}; at most {mb(limits.max_unpacked_bytes)}", status=413)
    for info, _ in members:
        if info.file_size > _member_allowance(info, limits):
            raise UploadRejected(_ratio_message(info, limits), status=413)
    folders = sorted({str(path.parent) for _, path in members})
    if len(folders) > 1:
        listed = ", ".join(shown(f, 40) for f in folders[:5]) + (" ..." if len(folders) > 5 else "")
        raise UploadRejected(f"the zip holds files in {len(folders)} folders ({listed}); zip one study's folder")
    return members


def _member_allowance(info: zipfile.ZipInfo, limits: UploadLimits) -> float:
    """Most bytes one member may unpack to under the ratio bound."""
    return max(limits.max_ratio * info.compress_size, limits.ratio_free_bytes)


def _ratio_message(info: zipfile.ZipInfo, limits: UploadLimits) -> str:
    return (f"zip member {shown(info.filename)} expands more than {limits.max_ratio:g} times "
            f"({info.compress_size} bytes compressed): refused as a zip bomb")


def extract_study_zip(zip_path: str | Path, dest: str | Path, limits: UploadLimits = UploadLimits()) -> Path:
    """Unpack an uploaded study safely and return the folder that holds its slices.

    Refused: a file that is not a zip or cannot be read (corrupt data, bad CRC), encrypted members,
    empty, overlong, absolute or ``..`` names and links (zip-slip), more than ``limits.max_files`` files,
    more than ``limits.max_unpacked_bytes`` in all or a member growing more than ``limits.max_ratio``
    times (zip bombs: the declared sizes are checked first, then the real byte counts while writing, and
    unpacking stops the moment a bound is crossed), no file at all, and files in several folders (one
    upload is one series). On any refusal ``dest`` is removed.

    Args:
        zip_path: the uploaded file.
        dest: folder to unpack into (created; must not exist yet).
        limits: the bounds.

    Returns:
        The folder (inside ``dest``) that holds every file of the zip.

    Raises:
        UploadRejected: with the reason (400 malformed or unsafe, 413 over a bound), naming the member.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    created = False
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = _check_members(archive, limits)
            dest.mkdir(parents=True)
            created, written = True, 0
            for info, path in members:
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                allowance, member_written = _member_allowance(info, limits), 0
                with archive.open(info) as source, target.open("wb") as sink:
                    while chunk := source.read(COPY_CHUNK):
                        written += len(chunk)
                        member_written += len(chunk)
                        if written > limits.max_unpacked_bytes:
                            raise UploadRejected(f"the zip unpacks to more than {mb(limits.max_unpacked_bytes)}", status=413)
                        if member_written > allowance:
                            raise UploadRejected(_ratio_message(info, limits), status=413)
                        sink.write(chunk)
    except BaseException as exc:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, UploadRejected):
            raise
        # Corrupt data surfaces as any of these (zlib.error from deflate, ValueError from bad names or offsets).
        if isinstance(exc, (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error,
                            ValueError)):
            raise UploadRejected(f"unreadable zip ({short(str(exc) or exc.__class__.__name__)})") from exc
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno not in _SERVER_ERRNOS:
            raise UploadRejected(f"cannot unpack the zip ({exc.strerror})") from exc
        raise
    folder = str(members[0][1].parent)
    return dest.joinpath(*PurePosixPath(folder).parts) if folder != "." else dest


def nifti_suffix(path: str | Path) -> str | None:
    """``.nii.gz`` or ``.nii`` when the file is a NIfTI-1/2 image (by its magic, gzipped or not), else None.

    Args:
        path: the file.
    """
    with Path(path).open("rb") as file:
        head = file.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as file:
            header = file.read(348)
    except (OSError, EOFError):
        return None
    if header[344:348] in (b"n+1\0", b"ni1\0") or header[4:8] == b"n+2\0":
        return ".nii.gz" if opener is gzip.open else ".nii"
    return None


def keep_nifti(path: Path, dest: Path, limits: UploadLimits = UploadLimits()) -> Path:
    """Keep an uploaded NIfTI CT as the study (one file) after bounding what it unpacks to.

    A gzipped file is streamed through once to count its unpacked bytes: the loader would otherwise inflate
    a gzip bomb in memory. The total and ratio bounds of a zip member apply to it.

    Args:
        path: the received file.
        dest: folder to write the study into (must not exist yet).
        limits: the bounds.

    Returns:
        The study file, ``dest/study.nii`` or ``dest/study.nii.gz``.
    """
    suffix = nifti_suffix(path) or ".nii"
    packed = path.stat().st_size
    unpacked = packed
    if suffix == ".nii.gz":
        unpacked = 0
        allowance = max(packed * limits.max_ratio, limits.ratio_free_bytes)
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(COPY_CHUNK):
                    unpacked += len(chunk)
                    if unpacked > min(limits.max_unpacked_bytes, allowance):
                        break
        except (OSError, EOFError, zlib.error) as exc:
            raise UploadRejected(f"the NIfTI file's gzip stream is damaged ({short(str(exc), 80)})") from exc
        if unpacked > allowance:
            raise UploadRejected(f"the NIfTI file unpacks to more than {limits.max_ratio:g} times its size "
                                 "(a gzip bomb?)", status=413)
    if unpacked > limits.max_unpacked_bytes:
        raise UploadRejected(f"the NIfTI image is larger than {mb(limits.max_unpacked_bytes)} unpacked", status=413)
    dest.mkdir(parents=True)
    return Path(shutil.move(str(path), dest / f"study{suffix}"))


@dataclass(frozen=True)
class UploadKind:
    """A kind of file the viewer accepts as a study.

    Attributes:
        description: how the page and messages name it ("a .zip of one study's DICOM files").
        accept: the file input's ``accept`` entries (suffixes and MIME types).
        matches: whether a received file is of this kind (by content, not by name).
        unpack: ``unpack(file, dest, limits) -> study folder`` (writes under ``dest``, removes it on refusal).
    """

    description: str
    accept: tuple[str, ...]
    matches: Callable[[Path], bool]
    unpack: Callable[[Path, Path, UploadLimits], Path]


#: The kinds of upload, tried in order; the first whose ``matches`` is true unpacks the file.
UPLOAD_KINDS: list[UploadKind] = [
    UploadKind("a .zip of one study's DICOM files", (".zip", "application/zip"), zipfile.is_zipfile, extract_study_zip),
    UploadKind("a .nii or .nii.gz CT", (".nii", ".gz", "application/gzip"), lambda p: nifti_suffix(p) is not None,
               keep_nifti),
]


def accepted_types() -> str:
    """The upload input's ``accept`` attribute: every kind's suffixes and MIME types."""
    return ",".join(entry for kind in UPLOAD_KINDS for entry in kind.accept)


def accepted_kinds() -> str:
    """What the page asks for: every kind's description, joined with "or"."""
    return " or ".join(kind.description for kind in UPLOAD_KINDS)


def unpack_upload(path: str | Path, dest: str | Path, limits: UploadLimits = UploadLimits()) -> Path:
    """Turn a received upload into a study folder under ``dest``.

    Args:
        path: the received file.
        dest: folder to write the study into (must not exist yet).
        limits: the bounds.

    Returns:
        The study's folder.

    Raises:
        UploadRejected: the file is of no known kind, or its unpacker refused it.
    """
    path = Path(path)
    for kind in UPLOAD_KINDS:
        if kind.matches(path):
            return kind.unpack(path, Path(dest), limits)
    raise UploadRejected(f"not a file the viewer reads: upload {accepted_kinds()}")


# ----------------------------------------------------------------------------------------------
# Study folders on the server
# ----------------------------------------------------------------------------------------------


def list_studies(studies_dir: str | Path | None) -> dict[str, Path]:
    """Studies a user may pick: NIfTI files in ``studies_dir``, and folders holding files one or two levels below it.

    Two levels cover both a plain folder of studies (``DIR/<UID>/``) and a Kaggle layout
    (``DIR/test_images/<UID>/``).

    Args:
        studies_dir: the ``--studies-dir`` folder, or None.

    Returns:
        Display name (path relative to ``studies_dir``, ``/``-separated) → folder, sorted by name.
    """
    if studies_dir is None or not Path(studies_dir).is_dir():
        return {}
    root = Path(studies_dir)
    found: dict[str, Path] = {}

    def holds_files(folder: Path) -> bool:
        return any(entry.is_file() and not entry.name.startswith(".") for entry in folder.iterdir())

    for nifti in sorted(p for p in root.iterdir() if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))):
        found[nifti.name] = nifti  # a NIfTI CT is a study of its own
    for first in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if holds_files(first):
            found[first.name] = first
            continue
        for second in sorted(p for p in first.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if holds_files(second):
                found[f"{first.name}/{second.name}"] = second
    return found

"""Studies the viewer accepts: an uploaded zip of one study's DICOM files (unpacked safely) or NIfTI CT, or a
listed folder or NIfTI file."""

from __future__ import annotations

import gzip
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from rsna_cspine.errors import CSpineError

#: Zip members that are packaging debris, never slices (macOS resource forks, Finder/Explorer files).
_DEBRIS = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
#: Bytes copied at a time (uploads and zip members).
COPY_CHUNK = 1 << 20


class UploadRejected(CSpineError):
    """An upload or a study choice the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, path: str | Path | None = None) -> None:
        super().__init__(message, path)
        self.status = status


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, refused when it could land outside the extraction folder."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise UploadRejected(f"unsafe path in the zip: {info.filename!r} (absolute or with '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadRejected(f"the zip holds a symbolic link: {info.filename!r}")
    return path


def extract_study_zip(zip_path: str | Path, dest: str | Path, max_bytes: int, max_files: int = 5000) -> Path:
    """Unpack an uploaded study safely and return the folder that holds its slices.

    Refused: a file that is not a zip, encrypted members, absolute or ``..`` paths and links (zip-slip),
    more than ``max_files`` files or ``max_bytes`` unpacked (zip bombs: the real byte count is checked
    while writing, not only the sizes the zip declares), no file at all, and files in several folders
    (one upload is one series).

    Args:
        zip_path: the uploaded file.
        dest: empty folder to unpack into.
        max_bytes: largest total unpacked size.
        max_files: most files.

    Returns:
        The folder (inside ``dest``) that holds every file of the zip.

    Raises:
        UploadRejected: with the reason, naming the offending member.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    nifti = _nifti_suffix(zip_path)
    if nifti and not zipfile.is_zipfile(zip_path):  # a NIfTI CT is a whole study in one file: kept as it is
        if zip_path.stat().st_size > max_bytes:
            raise UploadRejected(f"the NIfTI file is larger than {max_bytes / 2**20:.0f} MB", status=413)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(zip_path, dest / f"study{nifti}"))
    if not zipfile.is_zipfile(zip_path):
        raise UploadRejected("not a zip file: upload a .zip of one study's DICOM files, or a .nii/.nii.gz CT")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = []
            for info in archive.infolist():
                path = _member_path(info)
                if info.is_dir() or any(part in _DEBRIS or part.startswith("._") for part in path.parts):
                    continue
                if info.flag_bits & 0x1:
                    raise UploadRejected(f"encrypted zip member {info.filename!r}: upload an unencrypted zip")
                members.append((info, path))
            if not members:
                raise UploadRejected("the zip holds no files")
            if len(members) > max_files:
                raise UploadRejected(f"the zip holds {len(members)} files; at most {max_files} are accepted", status=413)
            declared = sum(info.file_size for info, _ in members)
            if declared > max_bytes:
                raise UploadRejected(f"the zip unpacks to {declared / 2**20:.0f} MB; at most {max_bytes / 2**20:.0f} MB", status=413)
            folders = sorted({str(path.parent) for _, path in members})
            if len(folders) > 1:
                shown = ", ".join(f"'{f}'" for f in folders[:5]) + (" ..." if len(folders) > 5 else "")
                raise UploadRejected(f"the zip holds files in {len(folders)} folders ({shown}); zip one study's folder")
            dest.mkdir(parents=True, exist_ok=True)
            written = 0
            for info, path in members:
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, target.open("wb") as sink:
                    while chunk := source.read(COPY_CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise UploadRejected(f"the zip unpacks to more than {max_bytes / 2**20:.0f} MB", status=413)
                        sink.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise UploadRejected(f"unreadable zip ({exc})") from exc
    return dest.joinpath(*PurePosixPath(folders[0]).parts) if folders[0] != "." else dest


def _nifti_suffix(path: Path) -> str | None:
    """``.nii.gz`` or ``.nii`` when the file is a NIfTI-1/2 image (by its magic, gzipped or not), else None."""
    with path.open("rb") as file:
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


def list_studies(studies_dir: str | Path | None) -> dict[str, Path]:
    """Study folders a user may pick: folders holding files, one or two levels below ``studies_dir``.

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

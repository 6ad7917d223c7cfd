"""Any CT a user has → a :class:`~rsna_cspine.io.volume.Volume`, and a set of paths → the studies they hold.

A study is one of:

* a folder of DICOM files (one series; the Kaggle layout's ``test_images/<UID>/``), single-frame slices,
  multi-frame files or both;
* one multi-frame DICOM file (Enhanced CT: the whole series in one file);
* one NIfTI file (``.nii``, ``.nii.gz``).

:func:`load_study` reads any of them; :func:`find_studies` expands what a user names (studies, or
folders of studies) into the list of studies, each with a unique name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rsna_cspine.errors import LayoutError
from rsna_cspine.io.volume import DICOM_SUFFIXES, NIFTI_SUFFIXES, Volume, study_name

logger = logging.getLogger(__name__)

#: Files a folder of studies may hold beside them without being taken for DICOM slices.
_NOT_DICOM_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".md", ".json", ".yaml", ".yml", ".html", ".png", ".jpg",
                                        ".pdf", ".zip", ".npz", ".npy", ".pt", ".log")
#: How deep below a named folder studies are looked for (``DIR/<study>``, ``DIR/test_images/<UID>``, ...).
_MAX_DEPTH = 3


def is_nifti(path: str | Path) -> bool:
    """Whether the path names a NIfTI file (by its ending: ``.nii`` or ``.nii.gz``)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def load_study(path: str | Path, *, workers: int | None = None) -> Volume:
    """Read one study, whatever form it has (see the module docstring).

    Args:
        path: a folder of DICOM files, a multi-frame DICOM file, or a NIfTI file.
        workers: DICOM loader worker processes (see ``io.dicom.load_series``).

    Raises:
        DicomSeriesError: a DICOM study that cannot be read (named file and cause).
        NiftiError: a NIfTI file that cannot be read or fails the plausibility checks.
    """
    path = Path(path)
    if is_nifti(path) and not path.is_dir():
        from rsna_cspine.io.nifti import load_nifti_volume

        return load_nifti_volume(path)
    from rsna_cspine.io.dicom import load_series

    return load_series(path, workers=workers)


@dataclass(frozen=True)
class StudyInput:
    """One study found among the paths a user gave.

    Attributes:
        name: its unique name (the folder or file name; ``_2``, ``_3`` ... appended when two share one).
        path: the folder or file.
        kind: ``dicom`` (folder), ``dicom-file`` (one multi-frame file) or ``nifti``.
    """

    name: str
    path: Path
    kind: str


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM file by its ending, or by the ``DICM`` marker after the 128-byte preamble."""
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.startswith(".") or name.endswith(_NOT_DICOM_SUFFIXES + NIFTI_SUFFIXES):
        return False
    try:
        with path.open("rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    return any(entry.is_file() and _looks_like_dicom(entry) for entry in folder.iterdir())


def _walk(path: Path, depth: int, found: list[tuple[Path, str]]) -> None:
    if path.is_file():
        if is_nifti(path):
            found.append((path, "nifti"))
        elif _looks_like_dicom(path):
            found.append((path, "dicom-file"))
        return
    if not path.is_dir() or path.name.startswith("."):
        return
    if _holds_dicom(path):
        found.append((path, "dicom"))
        return
    if depth >= _MAX_DEPTH:
        return
    for child in sorted(path.iterdir()):
        if child.is_dir() or is_nifti(child):
            _walk(child, depth + 1, found)


def find_studies(paths: Sequence[str | Path]) -> list[StudyInput]:
    """The studies the given paths hold, in the order given (a folder's studies sorted by name).

    Each path is a study (a folder holding DICOM files, a DICOM file, a NIfTI file) or a folder of
    studies (NIfTI files and study folders, up to three levels down). Two studies with one name get
    ``_2``, ``_3``, ... appended to the later ones (logged), so every name is unique.

    Args:
        paths: what the user named.

    Raises:
        LayoutError: a path that does not exist, or one that holds no study.
    """
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise LayoutError("does not exist", path)
        before = len(found)
        if path.is_file() and not is_nifti(path):
            found.append((path, "dicom-file"))  # named explicitly: the loader says if it is not a series
        else:
            _walk(path, 0, found)
        if len(found) == before:
            raise LayoutError("holds no study (no DICOM file, no .nii/.nii.gz file, no study folder)", path)
    seen: Counter[str] = Counter()
    studies = []
    for path, kind in dict.fromkeys(found):  # one path named twice is one study
        base = study_name(path)
        seen[base] += 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        if name != base:
            logger.warning("two studies are called %s: %s is named %s", base, path, name)
        studies.append(StudyInput(name, path, kind))
    return studies

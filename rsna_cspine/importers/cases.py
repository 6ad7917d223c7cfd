"""Where each data set keeps a case's image and labels: SRC → a list of :class:`Case`.

* ``verse``: ``*_seg-vert_msk.nii.gz`` anywhere under SRC, its image the ``<prefix>_ct.nii.gz`` of the same
  prefix (``rawdata/`` and ``derivatives/`` of VerSe'20, or one folder as in VerSe'19);
* ``ctspine1k``: ``<case>_seg.nii.gz`` anywhere under SRC, its image ``<case>.nii.gz`` (beside it or in
  the ``volumes`` tree);
* ``totalsegmentator``: subject folders holding ``ct.nii.gz`` and either ``segmentations/vertebrae_C*.nii.gz``
  (the data set's per-structure masks) or one multi-label map (``seg.nii.gz``, ``*_seg.nii.gz``, ...).

Any format also takes a CSV (``image,labels[,case]``, paths relative to the CSV) naming the pairs, for
layouts that match none of the above (a DICOM folder with its label map, for instance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rsna_cspine.errors import LayoutError
from rsna_cspine.io.study import is_nifti
from rsna_cspine.io.volume import study_name

_VERSE_SUFFIX = "_seg-vert_msk.nii.gz"
_CTSPINE_SUFFIX = "_seg.nii.gz"
#: Characters a StudyInstanceUID-like name keeps (file names, ledger records, CSV cells).
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Case:
    """One case of a data set.

    Attributes:
        case_id: the data set's name for it.
        image: its CT (NIfTI file, DICOM folder or Enhanced CT file); None when it was not found.
        labels: its multi-label map, or the folder of per-structure masks (TotalSegmentator).
    """

    case_id: str
    image: Path | None
    labels: Path

    @property
    def per_structure(self) -> bool:
        return self.labels.is_dir()

    def uid(self, fmt: str) -> str:
        """The imported study's name: ``<format>.<case>``, unsafe characters replaced by ``-``."""
        return f"{fmt}.{_UNSAFE.sub('-', self.case_id)}"


def _first(matches: list[Path]) -> Path | None:
    return sorted(matches)[0] if matches else None


def _verse(src: Path) -> list[Case]:
    cases = []
    for labels in sorted(src.rglob(f"*{_VERSE_SUFFIX}")):
        prefix = labels.name[: -len(_VERSE_SUFFIX)]
        cases.append(Case(prefix, _first(list(src.rglob(f"{prefix}_ct.nii.gz")) + list(src.rglob(f"{prefix}_ct.nii"))),
                          labels))
    return cases


def _ctspine1k(src: Path) -> list[Case]:
    cases = []
    for labels in sorted(src.rglob(f"*{_CTSPINE_SUFFIX}")):
        case = labels.name[: -len(_CTSPINE_SUFFIX)]
        beside = labels.with_name(f"{case}.nii.gz")
        image = beside if beside.is_file() else _first([p for p in src.rglob(f"{case}.nii.gz") if p != labels])
        cases.append(Case(case, image, labels))
    return cases


def _totalsegmentator(src: Path) -> list[Case]:
    cases = []
    for image in sorted(src.rglob("ct.nii.gz")):
        subject = image.parent
        masks = subject / "segmentations"
        if masks.is_dir():
            cases.append(Case(subject.name, image, masks))
            continue
        maps = [p for p in subject.iterdir() if is_nifti(p) and p != image and "seg" in p.name.lower()]
        if maps:
            cases.append(Case(subject.name, image, sorted(maps)[0]))
    return cases


def _from_csv(src: Path) -> list[Case]:
    try:
        table = pd.read_csv(src, dtype=str)
    except Exception as exc:  # noqa: BLE001 - any unreadable CSV
        raise LayoutError(f"not a readable CSV ({exc})", src) from exc
    missing = [c for c in ("image", "labels") if c not in table.columns]
    if missing:
        raise LayoutError(f"missing columns {missing}; expected image,labels[,case]", src)
    cases = []
    for row in table.itertuples(index=False):
        image, labels = src.parent / str(row.image), src.parent / str(row.labels)
        case = getattr(row, "case", None)
        cases.append(Case(str(case) if isinstance(case, str) and case else study_name(image), image, labels))
    return cases


def find_cases(fmt: str, src: str | Path) -> list[Case]:
    """The cases of a data set folder (or pairs CSV), sorted by name.

    Args:
        fmt: ``verse``, ``totalsegmentator`` or ``ctspine1k``.
        src: the data set's folder, or a CSV naming image/labels pairs.

    Raises:
        LayoutError: SRC missing, or holding no case of that format.
    """
    src = Path(src)
    if not src.exists():
        raise LayoutError("does not exist", src)
    if src.is_file() and src.suffix.lower() == ".csv":
        cases = _from_csv(src)
    else:
        cases = {"verse": _verse, "ctspine1k": _ctspine1k, "totalsegmentator": _totalsegmentator}[fmt](src)
    if not cases:
        raise LayoutError(f"no {fmt} case found (see rsna_cspine.importers.cases for the layouts read)", src)
    ids = [c.uid(fmt) for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise LayoutError(f"several cases would be called {repeated[:5]}: name them in a pairs CSV (case column)", src)
    return cases

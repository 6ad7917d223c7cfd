"""Vertebra label tables of the public spine data sets, mapped to the RSNA labels 1–7 = C1–C7.

Every other label (thoracic, lumbar, sacrum, organs, ...) becomes background: stage 1 is trained on
C1–C7 only (thoracic vertebrae of the RSNA files are folded into background too, see
``seg.preprocess.fold_labels``).

Sources:

* VerSe (VerSe'19 / VerSe'20, ``*_seg-vert_msk.nii.gz``): 1–7 = C1–C7, 8–19 = T1–T12, 20–25 = L1–L6,
  28 = T13 (repository ``anjany/verse``, ``README.md``, section "Data", commit 02b292b).
* CTSpine1K (``<case>_seg.nii.gz``): annotated with the VerSe numbering, labels 1–25 (its nnU-Net
  conversion ``Task056_VerSe2019.py`` scores labels 1..25, commit 016b20b; image ``<case>.nii.gz`` and
  labels ``<case>_seg.nii.gz``, ``ReadMe.md`` commit 7e0d212; repository ``MIRACLE-Center/CTSpine1K``).
* TotalSegmentator multi-label maps: ``class_map["total_v1"]`` (v1: vertebrae_C1 = 41 down to
  vertebrae_C7 = 35) and ``class_map["total"]`` (v2: vertebrae_C1 = 50 down to vertebrae_C7 = 44) in
  ``totalsegmentator/map_to_binary.py`` of ``wasserth/TotalSegmentator`` (commit 0275d30). The data set's
  per-structure masks (``segmentations/vertebrae_C1.nii.gz`` ...) are named, not numbered, and read by name.
"""

from __future__ import annotations

import numpy as np

from rsna_cspine.constants import VERTEBRAE

#: Source label → RSNA label (1..7 = C1..C7), per data set (TotalSegmentator per version).
CERVICAL_IDS: dict[str, dict[int, int]] = {
    "verse": {k: k for k in range(1, 8)},
    "ctspine1k": {k: k for k in range(1, 8)},
    "totalsegmentator-v1": {41 - k: k + 1 for k in range(7)},  # 41 = C1, ..., 35 = C7
    "totalsegmentator-v2": {50 - k: k + 1 for k in range(7)},  # 50 = C1, ..., 44 = C7
}

#: The data sets ``rsna-cspine import-labels --format`` knows.
FORMATS: tuple[str, ...] = ("verse", "totalsegmentator", "ctspine1k")
#: TotalSegmentator label-map versions (``--ts-version``).
TS_VERSIONS: tuple[str, ...] = ("v1", "v2")

#: TotalSegmentator's per-structure mask file of each cervical vertebra (data-set layout, any version).
TS_MASK_NAMES: dict[int, str] = {k + 1: f"vertebrae_{name}" for k, name in enumerate(VERTEBRAE)}


def table_name(fmt: str, ts_version: str = "v2") -> str:
    """The key of :data:`CERVICAL_IDS` for a format (TotalSegmentator: with its version).

    Args:
        fmt: one of :data:`FORMATS`.
        ts_version: TotalSegmentator's version, ``v1`` or ``v2``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "totalsegmentator":
        return fmt
    if ts_version not in TS_VERSIONS:
        raise ValueError(f"TotalSegmentator version must be one of {TS_VERSIONS}, got {ts_version!r}")
    return f"totalsegmentator-{ts_version}"


def cervical_lookup(fmt: str, ts_version: str = "v2") -> np.ndarray:
    """A 256-entry lookup table: source label → RSNA label (0 for every non-cervical label).

    Args:
        fmt: one of :data:`FORMATS`.
        ts_version: TotalSegmentator's version, ``v1`` or ``v2``.
    """
    lookup = np.zeros(256, dtype=np.uint8)
    for source, target in CERVICAL_IDS[table_name(fmt, ts_version)].items():
        lookup[source] = target
    return lookup

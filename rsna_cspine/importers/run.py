"""Public spine data sets → stage-1 training data in the RSNA layout (``rsna-cspine import-labels``).

For each case: the image is read as a :class:`~rsna_cspine.io.volume.Volume` (NIfTI, DICOM folder or
Enhanced CT), its labels are aligned with it through both affines (``io.nifti.load_segmentation``; a
case whose grids do not match is reported, not guessed), mapped to 1–7 = C1–C7 with the data set's table
(:mod:`~rsna_cspine.importers.tables`; everything else becomes background) and written:

    OUT/train_images/<uid>.nii.gz     the image (a NIfTI source copied as is, DICOM written as NIfTI)
    OUT/segmentations/<uid>.nii       labels 1–7, stored like the RSNA files
    OUT/train.csv                     one row per imported case, fracture labels empty (unknown)
    OUT/import_report.csv             every case: imported, skipped (no cervical label) or failed, and why

Empty fracture labels mark a study that stage 2, the prior and scoring leave out
(``io.kaggle.check_train_labels``); ``train-seg`` reads the folder through ``data.extra``. The run goes
through the project's :class:`~rsna_cspine.runner.StudyRunner`: a rerun skips finished cases.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.importers.cases import Case, find_cases
from rsna_cspine.importers.tables import TS_MASK_NAMES, cervical_lookup, table_name
from rsna_cspine.io.files import atomic_write_text
from rsna_cspine.io.study import is_nifti, load_study
from rsna_cspine.io.volume import NIFTI_SUFFIXES, Volume

logger = logging.getLogger(__name__)

#: Bumped when what an import writes changes, so that earlier records are not reused.
IMPORT_VERSION = 1
REPORT_COLUMNS: tuple[str, ...] = ("case", "StudyInstanceUID", "status", "vertebrae", "source_labels", "reason")


def _cervical_labels(case: Case, volume: Volume, fmt: str, ts_version: str) -> tuple[np.ndarray, list[int]]:
    """The case's labels on the volume's grid as RSNA values 1..7, and the source label values present."""
    from rsna_cspine.io.nifti import load_segmentation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the repairs are logged by load_segmentation itself
        if case.per_structure:
            labels = np.zeros(volume.shape, dtype=np.uint8)
            present = []
            for value, name in TS_MASK_NAMES.items():
                path = next((case.labels / f"{name}{s}" for s in NIFTI_SUFFIXES
                             if (case.labels / f"{name}{s}").is_file()), None)
                if path is not None:
                    mask = load_segmentation(path, volume, max_label=None) > 0
                    labels[mask] = value
                    present += [value] if mask.any() else []
            return labels, present
        source = load_segmentation(case.labels, volume, max_label=None)
    present = [int(v) for v in np.flatnonzero(np.bincount(source.ravel(), minlength=256)) if v != 0]
    return cervical_lookup(fmt, ts_version)[source], present


def import_case(case: Case, fmt: str, out: Path, ts_version: str = "v2") -> dict[str, object]:
    """Import one case (see the module docstring); a case without any cervical label writes nothing.

    Args:
        case: the case.
        fmt: its data set.
        out: the RSNA-layout folder written.
        ts_version: TotalSegmentator's label-map version.

    Returns:
        The ledger record: ``outputs``, ``status`` (``imported`` or ``skipped``), ``vertebrae`` found,
        ``source_labels`` present, ``reason``.

    Raises:
        CSpineError: the image or labels cannot be read, or their grids do not match.
    """
    from rsna_cspine.errors import LayoutError
    from rsna_cspine.io.nifti import save_segmentation, save_volume_nifti

    if case.image is None or not case.image.exists():
        raise LayoutError(f"case {case.case_id}: image not found", case.image or case.labels)
    if not case.labels.exists():
        raise LayoutError(f"case {case.case_id}: labels not found", case.labels)
    volume = load_study(case.image, workers=1)
    labels, present = _cervical_labels(case, volume, fmt, ts_version)
    found = [VERTEBRAE[v - 1] for v in range(1, 8) if (labels == v).any()]
    record: dict[str, object] = {"outputs": [], "vertebrae": " ".join(found),
                                 "source_labels": " ".join(map(str, present))}
    if not found:
        table = "per-structure vertebrae_C1..C7 masks" if case.per_structure else f"table {table_name(fmt, ts_version)}"
        reason = f"no cervical vertebra label (C1-C7, {table}); labels present: {record['source_labels'] or 'none'}"
        logger.warning("case %s skipped: %s", case.case_id, reason)
        return {**record, "status": "skipped", "reason": reason}
    uid = case.uid(fmt)
    images = out / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    if is_nifti(case.image) and case.image.is_file():
        suffix = ".nii.gz" if case.image.name.lower().endswith(".nii.gz") else ".nii"
        image_path = images / f"{uid}{suffix}"
        shutil.copyfile(case.image, image_path)
    else:
        image_path = save_volume_nifti(volume, images / f"{uid}.nii.gz")
    seg_path = out / "segmentations" / f"{uid}.nii"
    save_segmentation(labels, volume, seg_path)
    return {**record, "outputs": [str(image_path), str(seg_path)], "status": "imported", "reason": ""}


def _write_train_csv(out: Path, uids: list[str]) -> None:
    """Add the imported studies to ``OUT/train.csv`` with empty (unknown) fracture labels; other rows kept."""
    from rsna_cspine.io.kaggle import read_train_labels

    path = out / "train.csv"
    existing = read_train_labels(path, keep_unknown=True) if path.is_file() else pd.DataFrame()
    if len(existing):
        existing = existing[~existing["StudyInstanceUID"].isin(uids)]
    rows = pd.DataFrame({"StudyInstanceUID": uids, **{c: [np.nan] * len(uids) for c in TARGET_COLUMNS}})
    table = pd.concat([existing, rows], ignore_index=True) if len(existing) else rows
    atomic_write_text(path, table.to_csv(index=False))


def import_labels(
    fmt: str, src: str | Path, out: str | Path, *, ts_version: str = "v2", resume: bool = True, progress: bool = True
) -> pd.DataFrame:
    """Turn a public data set's images and vertebra label maps into stage-1 training data.

    Args:
        fmt: ``verse``, ``totalsegmentator`` or ``ctspine1k``.
        src: the data set's folder, or a CSV of ``image,labels[,case]`` pairs.
        out: the RSNA-layout folder to write (created; an existing train.csv keeps its other rows).
        ts_version: TotalSegmentator's multi-label map version (``v1`` or ``v2``; per-structure masks are
            read by name and need none).
        resume: skip cases an earlier run of the same settings finished.
        progress: tqdm bar.

    Returns:
        The report (:data:`REPORT_COLUMNS`), also written to ``OUT/import_report.csv``.
    """
    from rsna_cspine.runner import StudyLedger, StudyRunner

    table_name(fmt, ts_version)  # refuses an unknown format or version before any work
    out = Path(out)
    cases = {case.uid(fmt): case for case in find_cases(fmt, src)}
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"version": IMPORT_VERSION, "format": fmt, "ts_version": ts_version}
    runner = StudyRunner(StudyLedger(out / "import_ledger", fingerprint, resume=resume), desc="import",
                         progress=progress, failures_csv=out / "import_failures.csv")
    report = runner.run(list(cases), lambda uid: import_case(cases[uid], fmt, out, ts_version))
    rows = []
    for outcome in report.outcomes:
        record = outcome.record or {}
        status = str(record.get("status", "imported")) if outcome.status in ("done", "resumed") else "failed"
        rows.append({"case": cases[outcome.uid].case_id, "StudyInstanceUID": outcome.uid, "status": status,
                     "vertebrae": record.get("vertebrae", ""), "source_labels": record.get("source_labels", ""),
                     "reason": record.get("reason", "") if status != "failed" else outcome.reason})
    table = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    imported = table.loc[table["status"] == "imported", "StudyInstanceUID"].tolist()
    _write_train_csv(out, imported)
    atomic_write_text(out / "import_report.csv", table.to_csv(index=False))
    logger.info("%s: %d imported, %d skipped (no cervical label), %d failed; report in %s", src, len(imported),
                int((table["status"] == "skipped").sum()), int((table["status"] == "failed").sum()),
                out / "import_report.csv")
    return table

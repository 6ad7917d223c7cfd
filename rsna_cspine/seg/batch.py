"""``rsna-cspine predict-seg``: stage 1 over every study of a split, resumable: one mask file per study and
the vertebra table of all of them (the per-study work is :class:`~rsna_cspine.seg.predict.Segmenter`'s)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna_cspine.io.files import atomic_open, atomic_write_text
from rsna_cspine.io.volume import Volume
from rsna_cspine.runner import LEDGER_FOLDER, StudyLedger, StudyRunner, file_fingerprint
from rsna_cspine.seg.masks import VERTEBRA_COLUMNS, with_vertebra_dtypes
from rsna_cspine.seg.predict import SegmentationResult, load_segmenter
from rsna_cspine.seg.qc import QC_COLUMNS

#: Bumped when the masks or tables predict-seg writes change meaning, so earlier results are not resumed.
MASK_VERSION = 2


def study_uids(root: str | Path, split: str) -> list[str]:
    """Studies of a split in table order: train.csv for ``train``, test.csv (unique, first seen) for ``test``.

    Train studies with unknown fracture labels (imported for stage 1) are included: they have images.

    Args:
        root: Kaggle-layout folder.
        split: ``train`` or ``test``.
    """
    from rsna_cspine.io.kaggle import KaggleLayout, read_test_csv, read_train_labels

    layout = KaggleLayout(root)
    if split == "train":
        table = read_train_labels(layout.train_csv, keep_unknown=True)
    elif split == "test":
        table = read_test_csv(layout.test_csv)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return list(dict.fromkeys(table["StudyInstanceUID"].astype(str)))


def write_mask(path: str | Path, mask: np.ndarray, slice_numbers: np.ndarray) -> Path:
    """Write a label mask (uint8 ``(z, y, x)``) and its slice numbers to a compressed ``.npz``, atomically:
    the mask format of ``predict-seg`` and ``rsna-cspine prepare``.

    Args:
        path: destination ``<uid>_mask.npz``.
        mask: labels at the study's resolution.
        slice_numbers: the study's slice numbers, one per mask slice.
    """
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, mask=np.asarray(mask, dtype=np.uint8), slice_numbers=np.asarray(slice_numbers))
    return path


def save_mask(path: str | Path, result: SegmentationResult, volume: Volume) -> Path:
    """Write a study's segmentation with :func:`write_mask`.

    Args:
        path: destination ``<uid>_mask.npz``.
        result: the study's segmentation.
        volume: the study (for its slice numbers).
    """
    return write_mask(path, result.mask, volume.slice_numbers)


def _json_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows as JSON-able dicts (missing values → None, numpy scalars → Python numbers)."""
    return [
        {key: None if pd.isna(value) else value.item() if isinstance(value, np.generic) else value for key, value in row.items()}
        for row in table.to_dict("records")
    ]


def predict_studies(
    root: str | Path,
    split: str,
    checkpoints: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    studies: Sequence[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Segment many studies: ``<out>/<uid>_mask.npz`` each and the table of all of them, ``<out>/vertebrae.csv``
    (with the quality check's ``height_mm``, ``volume_ml`` and ``qc`` per vertebra; the masks hold only the
    vertebrae it kept).

    Resumable: a study finished by an earlier run with the same checkpoints and data (the ledger in
    ``<out>/finished/``) whose mask file exists is skipped. A study that fails is logged and listed in
    ``<out>/predict_failures.csv``; the batch goes on.

    Args:
        root: Kaggle-layout folder.
        split: ``train`` or ``test``.
        checkpoints: stage-1 checkpoint(s) (several are ensembled).
        out_dir: output folder.
        studies: only these UIDs (default: every study of the split).
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        progress: tqdm bar.
        shard: ``(i, n)`` to segment only studies ``k`` with ``k % n == i`` (several machines, one folder).

    Returns:
        The whole ``vertebrae.csv`` table after this run (every finished study of the folder).
    """
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.io.study import load_study

    layout = KaggleLayout(root)
    out_dir = Path(out_dir)
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    fingerprint = {"version": MASK_VERSION, "checkpoints": [file_fingerprint(p) for p in paths],
                   "data": str(layout.root.resolve()), "split": split}
    ledger = StudyLedger(out_dir / LEDGER_FOLDER, fingerprint)
    runner = StudyRunner(ledger, shard=shard, desc="predict-seg", progress=progress,
                         failures_csv=out_dir / "predict_failures.csv")
    plan = runner.plan(list(studies) if studies else study_uids(root, split))
    segmenter = load_segmenter(paths, device) if plan.todo else None

    def segment_one(uid: str) -> dict[str, Any]:
        volume = load_study(layout.study_path(uid, split))  # a DICOM folder, or an imported NIfTI / Enhanced CT file
        result = segmenter.predict(volume)  # type: ignore[union-attr]
        mask_path = save_mask(out_dir / f"{uid}_mask.npz", result, volume)
        return {"outputs": [str(mask_path)], "vertebrae": _json_rows(result.vertebrae)}

    runner.run(plan, segment_one)
    finished = ledger.records()
    selected = set(plan.selected)
    order = [u for u in plan.selected if u in finished] + [u for u in finished if u not in selected]
    rows = [{"StudyInstanceUID": uid, **row} for uid in order for row in finished[uid]["vertebrae"]]
    table = with_vertebra_dtypes(pd.DataFrame(rows, columns=["StudyInstanceUID", *VERTEBRA_COLUMNS, *QC_COLUMNS]))
    atomic_write_text(out_dir / "vertebrae.csv", table.to_csv(index=False))
    return pd.read_csv(out_dir / "vertebrae.csv", dtype={"StudyInstanceUID": str})

"""Write a whole synthetic dataset in the exact Kaggle RSNA 2022 layout.

    OUT/train.csv                  StudyInstanceUID, patient_overall, C1..C7
    OUT/test.csv                   row_id, StudyInstanceUID, prediction_type (8 rows per test study)
    OUT/sample_submission.csv      row_id, fractured (= 0.5)
    OUT/train_bounding_boxes.csv   StudyInstanceUID, x, y, width, height, slice_number
    OUT/train_images/<UID>/<n>.dcm
    OUT/test_images/<UID>/<n>.dcm
    OUT/segmentations/<UID>.nii    (train studies)

plus three files the real layout does not have: ``test_labels.csv`` (the test studies' true labels,
same columns as train.csv, for scoring held-out predictions), ``synth_studies.csv`` (per-study
generation and storage details) and ``synth_config.yaml`` (the config that made the data).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import LayoutError
from rsna_cspine.synth.config import SynthConfig
from rsna_cspine.synth.phantom import make_phantom, study_fov_kind
from rsna_cspine.synth.writer import (
    available_codecs,
    make_uid,
    plan_storage,
    write_dicom_series,
    write_segmentation,
)

LABEL_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
_GENERATED = ("train_images", "test_images", "segmentations")


def study_streams(cfg: SynthConfig, index: int) -> tuple[np.random.Generator, np.random.Generator,
                                                         np.random.Generator]:
    """Independent ``(phantom, storage, split)`` generators of study ``index``.

    Each study's seed sequence is spawned from ``cfg.seed`` with its own index as key, so study ``k`` is
    the same whatever ``n_studies`` is.
    """
    sequence = np.random.SeedSequence(cfg.seed, spawn_key=(index,))
    return tuple(np.random.default_rng(child) for child in sequence.spawn(3))  # type: ignore[return-value]


def study_uid(cfg: SynthConfig, index: int) -> str:
    """StudyInstanceUID of study ``index``: ``1.2.826.0.1.3680043.<digits>``, fixed by seed and index."""
    return make_uid(cfg.seed, index)


def write_dataset(out_dir: str | Path, cfg: SynthConfig, progress: bool = True,
                  overwrite: bool = False, workers: int = 1) -> pd.DataFrame:
    """Generate ``cfg.n_studies`` phantoms and write them in the Kaggle layout.

    ``OUT/test_labels.csv`` holds the test studies' true labels: the real Kaggle layout has no such
    file (its test labels are hidden); it exists here so held-out predictions can be scored. Few-slice
    studies (``fov_slab_fraction``) go to the train split unless there are too few others: Kaggle's
    test studies all cover the neck.

    Args:
        out_dir: dataset root (created).
        cfg: generator settings.
        progress: show a tqdm bar over studies.
        overwrite: delete earlier ``train_images``/``test_images``/``segmentations`` first; without it a
            non-empty earlier output is an error (mixing two runs would corrupt the layout).
        workers: studies made at once in separate processes (the files are the same for any number).

    Returns:
        One row per study (train and test) with the label columns, ``split`` and generation details.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _GENERATED:
        folder = out / name
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise LayoutError(f"{name}/ already holds files; pass overwrite=True to replace them", folder)
            shutil.rmtree(folder)
    codecs = available_codecs()

    streams = [study_streams(cfg, k) for k in range(cfg.n_studies)]
    split_draws = [rng.random(3) for _, _, rng in streams]  # (split rank, segmentation, boxes)
    # A few-slice study is a training aid for stage 1 (what a scan without the neck looks like); the
    # test split mimics Kaggle's test studies, which all cover the neck.
    fov = [study_fov_kind(cfg, rng) for rng, _, _ in streams]
    n_test = int(round(cfg.n_studies * cfg.test_fraction))
    ranks = [d[0] if kind != "slab" else 2.0 + d[0] for d, kind in zip(split_draws, fov)]
    test_indices = set(np.argsort(ranks, kind="stable")[:n_test].tolist())

    jobs = [(out, cfg, codecs, k, k in test_indices, split_draws[k]) for k in range(cfg.n_studies)]
    bar = tqdm(total=cfg.n_studies, desc="synth studies", disable=not progress, unit="study")
    results: list[tuple[dict, list[dict]]] = []
    if workers > 1 and cfg.n_studies > 1:
        # Every study has its own seed streams and files, so studies are made in any order, in parallel.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for result in pool.map(_write_study_job, jobs):
                results.append(result)
                bar.update()
    else:
        for job in jobs:
            results.append(_write_study(*job))
            bar.update()
    bar.close()
    rows = [row for row, _ in results]
    boxes = [box for _, study_boxes in results for box in study_boxes]

    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=LABEL_COLUMNS + ["split"])
    _write_tables(out, table, boxes)
    table.to_csv(out / "synth_studies.csv", index=False)
    (out / "synth_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return table


def _write_study(out: Path, cfg: SynthConfig, codecs: list, k: int, is_test: bool,
                 draws: np.ndarray) -> tuple[dict, list[dict]]:
    """Make and write study ``k``; its row of ``synth_studies.csv`` and its box rows."""
    boxes: list[dict] = []
    phantom_rng, storage_rng, _ = study_streams(cfg, k)
    uid = study_uid(cfg, k)
    phantom = make_phantom(cfg, phantom_rng)
    storage = plan_storage(phantom, storage_rng, cfg, codecs)
    write_dicom_series(phantom, out / ("test_images" if is_test else "train_images") / uid, uid, storage)
    has_segmentation = (not is_test) and draws[1] < cfg.segmentation_fraction
    if has_segmentation:
        write_segmentation(phantom, out / "segmentations" / f"{uid}.nii", storage)
    n_boxes = 0
    if not is_test and phantom.patient_overall and draws[2] < cfg.bbox_fraction:
        for box in phantom.fracture_boxes:
            boxes.append({"StudyInstanceUID": uid, "x": float(box["x"]), "y": float(box["y"]),
                          "width": float(box["width"]), "height": float(box["height"]),
                          "slice_number": storage.file_numbers[box["z"]]})
            n_boxes += 1
    row = {
        "StudyInstanceUID": uid,
        "patient_overall": phantom.patient_overall,
        **{name: phantom.fractured[name] for name in VERTEBRAE},
        "split": "test" if is_test else "train",
        "study_index": k,
        "n_slices": int(phantom.hu.shape[0]),
        "image_size": int(phantom.hu.shape[1]),
        "slice_spacing_mm": phantom.spacing[0],
        "pixel_spacing_mm": phantom.spacing[1],
        "codec": storage.codec,
        "transfer_syntax": storage.transfer_syntax,
        "pixel_representation": storage.pixel_representation,
        "bits_stored": storage.bits_stored,
        "numbering": storage.numbering,
        "mixed_rescale": storage.mixed_rescale,
        "circular_fov": phantom.circular_fov,
        "has_segmentation": has_segmentation,
        "n_boxes": n_boxes,
        "fracture_kinds": json.dumps(phantom.fracture_kinds, sort_keys=True),
        "fov": phantom.fov,
        "scan_top_mm": round(phantom.scan_top_mm, 1),
    }
    return row, boxes


def _write_study_job(job: tuple) -> tuple[dict, list[dict]]:
    return _write_study(*job)


def _write_tables(out: Path, table: pd.DataFrame, boxes: list[dict]) -> None:
    train = table[table["split"] == "train"]
    test = table[table["split"] == "test"]
    train[LABEL_COLUMNS].to_csv(out / "train.csv", index=False)
    test[LABEL_COLUMNS].to_csv(out / "test_labels.csv", index=False)
    test_rows = [{"row_id": f"{uid}_{kind}", "StudyInstanceUID": uid, "prediction_type": kind}
                 for uid in test["StudyInstanceUID"] for kind in TARGET_COLUMNS]
    test_table = pd.DataFrame(test_rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test_table.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test_table["row_id"], "fractured": 0.5}).to_csv(
        out / "sample_submission.csv", index=False)
    pd.DataFrame(boxes, columns=BOX_COLUMNS).to_csv(out / "train_bounding_boxes.csv", index=False)

"""One study, decoded once, turned into everything training needs (the per-study function of ``prepare``).

:func:`prepare_study` loads the series once and writes, from that one volume: the stage-1 input (the
volume on the network grid, or the cascade's fine box and coarse whole-study image, plus labels where
``segmentations/<uid>.nii`` exists), the mask the crops are cut from (the stage-1 models' or the true
one), the seven 2.5D stacks with slice labels and box maps, and returns the study's manifest row
(geometry, timings, warnings). It runs in worker processes, so it is a module-level function of a
picklable :class:`StudyJob`.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsna_cspine.training.prepared import PreparedCache
from rsna_cspine.prepare.config import PrepareConfig
from rsna_cspine.runner import Record

#: Stage-1 models of this process, loaded by its first study that needs them (key: checkpoint paths, device).
_SEGMENTER: tuple[tuple[str, ...], Any] | None = None


@dataclass(frozen=True)
class StudyJob:
    """What every study of one ``prepare`` run shares (pickled once per worker process).

    Attributes:
        root: the Kaggle-layout folder.
        split: ``train`` or ``test``.
        out: the cache folder.
        cfg: the settings.
        seg_models: stage-1 checkpoints (empty: none).
        boxes: uid → ``(n, 5)`` rows ``(slice_number, x, y, width, height)`` of the bounding boxes.
        decode_workers: processes decoding one study's slices (its share of the CPU budget).
        stage1_studies: the studies that get the stage-1 input; None: every study. The others get their mask
            and crops only (a run whose stage 1 trains on a few of many studies: the demo).
    """

    root: str
    split: str
    out: str
    cfg: PrepareConfig
    seg_models: tuple[str, ...] = ()
    boxes: dict[str, np.ndarray] = field(default_factory=dict)
    decode_workers: int = 1
    stage1_studies: frozenset[str] | None = None

    def writes_stage1(self, uid: str) -> bool:
        return self.stage1_studies is None or uid in self.stage1_studies


def study_inputs(job: StudyJob, uid: str) -> dict[str, Any]:
    """A study's own inputs (what makes its prepared files stale when it changes): the names and sizes of
    its files, the size of its segmentation and its bounding-box rows. Sizes rather than times, so that
    machines holding copies of the data set agree.

    Args:
        job: the run.
        uid: the study.
    """
    from rsna_cspine.io.kaggle import KaggleLayout

    layout = KaggleLayout(Path(job.root))
    where = layout.study_path(uid, job.split)  # a DICOM folder, or an imported NIfTI / Enhanced CT file
    if where.is_dir():
        files = sorted((p.name, p.stat().st_size) for p in where.iterdir() if p.is_file())
    else:
        files = [(where.name, where.stat().st_size)] if where.is_file() else None
    seg = layout.segmentation_path(uid) if job.split == "train" else None
    boxes = job.boxes.get(uid)
    inputs = {
        "files": None if files is None else hashlib.sha1(json.dumps(files).encode()).hexdigest(),
        "n_files": None if files is None else len(files),
        "segmentation": None if seg is None else seg.stat().st_size,
        "boxes": None if boxes is None else hashlib.sha1(np.ascontiguousarray(boxes).tobytes()).hexdigest(),
    }
    if job.stage1_studies is not None:  # a study prepared without its stage-1 input is redone when it needs one
        inputs["stage1_input"] = job.writes_stage1(uid)
    return inputs


#: Bytes of one uncompressed 512² 16-bit slice: a single-file study's (NIfTI, Enhanced CT) slice count estimate.
_SLICE_BYTES = 512 * 512 * 2


def study_size(job: StudyJob, uid: str) -> tuple[int, int]:
    """How much work a study is, known before it is decoded: ``(slices, bytes)`` of its files.

    The slices are the folder's files (decoding and resampling cost grows with them, whatever the
    codec); a single-file study (NIfTI, Enhanced CT) counts as many slices as its bytes would hold
    uncompressed at 512². A missing study is ``(0, 0)``.

    Args:
        job: the run.
        uid: the study.
    """
    from rsna_cspine.io.kaggle import KaggleLayout

    where = KaggleLayout(Path(job.root)).study_path(uid, job.split)
    try:
        if where.is_dir():
            sizes = [entry.stat().st_size for entry in os.scandir(where) if entry.is_file()]
            return len(sizes), sum(sizes)
        size = where.stat().st_size
    except OSError:  # missing or unreadable: the study fails when it is prepared, and says why there
        return 0, 0
    return max(1, size // _SLICE_BYTES), size


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (a study's decoder processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _segmenter(job: StudyJob) -> Any:
    """This process's stage-1 models (loaded once, then reused by every study it prepares)."""
    global _SEGMENTER
    from rsna_cspine.seg.predict import load_segmenter

    key = (*job.seg_models, job.cfg.device)
    if _SEGMENTER is None or _SEGMENTER[0] != key:
        _SEGMENTER = (key, load_segmenter(list(job.seg_models), job.cfg.device))
    return _SEGMENTER[1]


def _mask_plan(job: StudyJob, has_labels: bool) -> str:
    """Which mask this study's crops come from: ``gt``, ``pred`` or ``""`` (none available)."""
    source = job.cfg.mask_source
    if source == "auto":
        source = "pred" if job.seg_models else "gt"
    elif source == "gt_then_pred":
        source = "gt" if has_labels else "pred"
    if (source == "gt" and not has_labels) or (source == "pred" and not job.seg_models):
        return ""
    return source


def prepare_study(uid: str, job: StudyJob) -> Record:
    """Decode one study once and write its stage-1 input, mask and crops; its manifest row (ledger record).

    Args:
        uid: the study.
        job: what the run's studies share.

    Returns:
        The record: ``outputs`` (files relative to the cache), ``inputs`` (:func:`study_inputs`) and the
        manifest columns (``training.prepared.MANIFEST_COLUMNS``); a study without a usable mask gets no crops
        and says why in ``reason``.
    """
    from rsna_cspine.crops.cache import save_crops, study_crops
    from rsna_cspine.io.dicom.decode import single_threaded_decoding
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.io.study import load_study
    from rsna_cspine.seg.batch import write_mask
    from rsna_cspine.seg.preprocess import fold_labels, write_stage1_input

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    seconds: dict[str, float] = {}
    inputs = study_inputs(job, uid)
    layout, cache, cfg = KaggleLayout(Path(job.root)), PreparedCache(job.out), job.cfg

    tick = time.perf_counter()
    # The one decode. On a one-thread budget, single-threaded decoders (GDCM's JPEG 2000 would use every core).
    with single_threaded_decoding(job.decode_workers == 1):
        volume = load_study(layout.study_path(uid, job.split), workers=job.decode_workers)
    seg_file = layout.segmentation_path(uid) if job.split == "train" else None
    labels = None if seg_file is None else load_segmentation(seg_file, volume)
    seconds["load"] = time.perf_counter() - tick

    tick = time.perf_counter()
    s1, seg_path, image = cfg.stage1, None, None
    if job.writes_stage1(uid):
        seg_path, image = write_stage1_input(cache.seg_path(uid), volume, labels, s1.grid, s1.hu_window,
                                             antialias=s1.antialias, cascade=s1.cascade())
    seconds["stage1"] = time.perf_counter() - tick

    tick = time.perf_counter()
    source, mask, vertebrae = _mask_plan(job, labels is not None), None, None
    if source == "pred":
        segmenter = _segmenter(job)
        reuse = image is not None and segmenter.accepts(s1.grid, s1.hu_window, s1.antialias)
        result = segmenter.predict(volume, image if reuse else None)
        mask, vertebrae = result.mask, result.vertebrae
    elif source == "gt":
        mask = fold_labels(labels)  # type: ignore[arg-type]
    del image
    mask_path = None if mask is None else write_mask(cache.mask_path(uid), mask, volume.slice_numbers)
    seconds["mask"] = time.perf_counter() - tick

    tick = time.perf_counter()
    n_present, reason, crop_path = 0, "", None
    if mask is not None:
        crops = study_crops(volume, mask, cfg.crop, job.boxes.get(uid))
        crop_path = save_crops(cache.crop_path(uid), crops, mask_source=source)
        n_present = int(crops.present.sum())
    else:
        reason = ("no crops: the study has no segmentation and no stage-1 models were given (--seg-models)"
                  if job.split == "train" else "no crops: no stage-1 models were given (--seg-models)")
    seconds["crops"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    # CPU time beside the wall time: a study that waited for a core (other load, too many workers) shows
    # a wall time well above its CPU time; one slowed by memory or cache contention, more CPU per slice.
    seconds["cpu"] = _cpu_seconds() - cpu_started

    outputs = [p for p in (seg_path, mask_path, crop_path) if p is not None]
    seg_file, mask_file, crop_file = (cache.relative(p) if p is not None else "" for p in (seg_path, mask_path, crop_path))
    record: Record = {
        "StudyInstanceUID": uid, "status": "done", "reason": reason, "n_slices": volume.shape[0],
        "rows": volume.shape[1], "cols": volume.shape[2],
        **{f"spacing_{axis}": round(float(mm), 6) for axis, mm in zip("zyx", volume.spacing)},
        "has_labels": labels is not None,
        "mask_source": source, "n_present": n_present, "has_boxes": uid in job.boxes, "seg_file": seg_file,
        "mask_file": mask_file, "crop_file": crop_file,
        "bytes": sum(p.stat().st_size for p in outputs), "decode_workers": job.decode_workers,
        **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()},
        "warnings": list(volume.warnings), "outputs": [cache.relative(p) for p in outputs], "inputs": inputs,
    }  # fmt: skip
    if vertebrae is not None:
        record["vertebrae"] = json.loads(vertebrae.to_json(orient="records"))
    return record

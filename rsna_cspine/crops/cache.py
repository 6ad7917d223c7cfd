"""Crop cache: one ``<uid>.npz`` per study holding its seven vertebra stacks and slice-level labels.

Building crops means decoding a whole DICOM series, so it is done once per study and reused by every
epoch and fold. The cache is resumable (existing files are skipped), a study that fails is logged and
listed but does not stop the others, and the crop settings are recorded beside the files so that a
cache built with other settings is never silently reused.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from rsna_cspine.config import to_dict
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.crops.extract import (
    RETIRED_CROP_SETTINGS,
    CropConfig,
    VertebraCrops,
    box_maps_from_boxes,
    extract_vertebra_crops,
    slice_labels_from_boxes,
)
from rsna_cspine.errors import ConfigError, CSpineError, LayoutError

log = logging.getLogger(__name__)

MASK_SOURCES: tuple[str, ...] = ("gt", "pred", "gt_then_pred")
SETTINGS_FILE = "crop_config.yaml"
#: How slice labels were drawn from the boxes; recorded so a cache built under another rule is refused.
SLICE_LABEL_RULE = "box slice in the vertebra's range and box rectangle touching its mask; box maps in crop pixels"
INDEX_FILE = "cache_index.csv"
INDEX_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "path", "status", "mask_source", "n_present", "has_boxes", "error")


def crop_path(cache_dir: str | Path, uid: str) -> Path:
    """Where a study's crops live."""
    return Path(cache_dir) / f"{uid}.npz"


def save_crops(path: str | Path, crops: VertebraCrops, mask_source: str = "") -> Path:
    """Write one study's crops atomically (a killed run never leaves a half-written file behind).

    Args:
        path: destination ``.npz``.
        crops: the study's stacks and labels.
        mask_source: which mask produced them ("gt" or "pred"), kept for reports.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One archive member per vertebra: a training item then decompresses only its own stack.
    arrays = {f"images_{name}": crops.images[i] for i, name in enumerate(VERTEBRAE)}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez_compressed(
            fh,
            present=crops.present,
            slice_index=crops.slice_index,
            z_range=crops.z_range,
            boxes=crops.boxes,
            slice_labels=crops.slice_labels,
            box_maps=crops.box_maps,
            mask_source=np.array(mask_source),
            **arrays,
        )
    os.replace(tmp, path)
    return path


def load_crops(path: str | Path) -> VertebraCrops:
    """Read a study's crops written by :func:`save_crops`.

    Args:
        path: the ``.npz`` file.
    """
    path = Path(path)
    try:
        with np.load(path) as data:
            images = np.stack([data[f"images_{name}"] for name in VERTEBRAE])
            return VertebraCrops(
                images=images,
                present=data["present"],
                slice_index=data["slice_index"],
                z_range=data["z_range"],
                boxes=data["boxes"],
                slice_labels=data["slice_labels"],
                box_maps=data["box_maps"],
            )
    except (OSError, KeyError, ValueError) as exc:
        raise CSpineError(f"unreadable crop file ({exc})", path) from exc


def load_vertebra_stack(path: str | Path, vertebra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vertebra's stack, slice labels and box maps, without decompressing the other six stacks.

    Args:
        path: the study's ``.npz`` file.
        vertebra: 0-based index (0 = C1).

    Returns:
        ``images (N, C, S, S)`` as stored, ``slice_labels (N,)`` int8 and ``box_maps (N, S, S)`` uint8.
    """
    try:
        with np.load(path) as data:
            return data[f"images_{VERTEBRAE[vertebra]}"], data["slice_labels"][vertebra], data["box_maps"][vertebra]
    except (OSError, KeyError, ValueError) as exc:
        raise CSpineError(f"unreadable crop file ({exc})", path) from exc


def _check_settings(cache_dir: Path, cfg: CropConfig) -> None:
    """Record the crop settings in the cache folder, or refuse a folder built with other settings."""
    wanted = {**to_dict(cfg), "slice_label_rule": SLICE_LABEL_RULE}
    settings = cache_dir / SETTINGS_FILE
    if settings.is_file():
        found = yaml.safe_load(settings.read_text()) or {}
        # A cache that recorded a removed setting at its neutral value holds the same crops.
        found = {k: v for k, v in found.items() if not (k in RETIRED_CROP_SETTINGS and RETIRED_CROP_SETTINGS[k] == v)}
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ConfigError(f"crop cache was built with other settings (differs in {changed}); use another folder", settings)
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings.write_text(yaml.safe_dump(wanted, sort_keys=False))


def _load_mask(
    layout_root: str, uid: str, volume: object, mask_source: str, pred_mask_dir: str | None
) -> tuple[np.ndarray, str]:
    """The study's label map aligned with its volume, and which source gave it."""
    from rsna_cspine.io.kaggle import KaggleLayout

    layout = KaggleLayout(Path(layout_root))
    gt_path = layout.segmentation_path(uid)
    if mask_source in ("gt", "gt_then_pred") and gt_path is not None:
        from rsna_cspine.io.nifti import load_segmentation

        return load_segmentation(gt_path, volume), "gt"
    if mask_source == "gt":
        raise LayoutError("no ground-truth segmentation for this study", layout.segmentations / f"{uid}.nii")
    if pred_mask_dir is None:
        raise ConfigError(f"mask_source={mask_source!r} needs pred_mask_dir for study {uid}")
    pred_path = Path(pred_mask_dir) / f"{uid}_mask.npz"
    if not pred_path.is_file():
        raise LayoutError("predicted mask not found (run `rsna-cspine predict-seg` first)", pred_path)
    with np.load(pred_path) as data:
        if "mask" not in data:
            raise LayoutError(f"no 'mask' array; keys {list(data.keys())}", pred_path)
        mask = data["mask"]
    if mask.shape != volume.hu.shape:  # type: ignore[attr-defined]
        raise LayoutError(f"mask shape {mask.shape} differs from the volume {volume.hu.shape}", pred_path)  # type: ignore[attr-defined]
    return mask, "pred"


def _box_slices(volume: object, boxes: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """z indices and ``(x, y, width, height)`` of a study's boxes, matched by ``slice_number`` to the
    volume's file numbers; ``(None, None)`` when the study has no boxes.

    Args:
        volume: the loaded series.
        boxes: ``(n, 5)`` rows ``(slice_number, x, y, width, height)``, or None.
    """
    if boxes is None:
        return None, None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    z_of_number = {int(n): z for z, n in enumerate(volume.slice_numbers)}  # type: ignore[attr-defined]
    numbers = boxes[:, 0].astype(int)
    matched = np.array([n in z_of_number for n in numbers], dtype=bool)
    if not matched.all():
        unmatched = sorted(set(numbers[~matched].tolist()))
        log.warning("%s: %d box slice_number(s) match no file, e.g. %s", volume.study_uid, len(unmatched), unmatched[:3])  # type: ignore[attr-defined]
    z = np.array([z_of_number[n] for n in numbers[matched]], dtype=np.int64)
    return z, boxes[matched, 1:]


def _build_one(
    layout_root: str,
    uid: str,
    split: str,
    mask_source: str,
    pred_mask_dir: str | None,
    out_path: str,
    cfg: CropConfig,
    study_boxes: np.ndarray | None,
) -> dict[str, object]:
    """Load, crop and save one study; never raises for a bad study (the row says what went wrong)."""
    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.io.kaggle import KaggleLayout

    row: dict[str, object] = {"StudyInstanceUID": uid, "path": out_path, "has_boxes": study_boxes is not None}
    try:
        volume = load_series(KaggleLayout(Path(layout_root)).study_dir(uid, split))
        mask, used = _load_mask(layout_root, uid, volume, mask_source, pred_mask_dir)
        crops = extract_vertebra_crops(volume.hu, mask, cfg, spacing=volume.spacing)
        box_z, box_rects = _box_slices(volume, study_boxes)
        crops.slice_labels = slice_labels_from_boxes(crops, box_z, cfg.half_width, box_rects, mask)
        crops.box_maps = box_maps_from_boxes(crops, box_z, cfg.half_width, box_rects, mask)
        save_crops(out_path, crops, mask_source=used)
        row.update(status="built", mask_source=used, n_present=int(crops.present.sum()), error="")
    except Exception as exc:  # noqa: BLE001 - one broken study must not stop a 2,000-study build
        row.update(status="failed", mask_source="", n_present=0, error=f"{exc.__class__.__name__}: {exc}")
    return row


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # processes already give the parallelism; threads would oversubscribe


def build_crop_cache(
    layout: object,
    uids: list[str],
    mask_source: str,
    cache_dir: str | Path,
    cfg: CropConfig,
    pred_mask_dir: str | Path | None = None,
    split: str = "train",
    num_workers: int = 0,
) -> pd.DataFrame:
    """Write ``<cache_dir>/<uid>.npz`` for every study that does not have one yet.

    Slice-level labels come from ``train_bounding_boxes.csv`` when the layout has it: a study listed
    there gets 1/0 per centre slice (see :func:`slice_labels_from_boxes`), others -1 (unknown).

    Args:
        layout: a :class:`rsna_cspine.io.kaggle.KaggleLayout`.
        uids: studies to cache.
        mask_source: ``"gt"`` (segmentation NIfTI), ``"pred"`` (``<pred_mask_dir>/<uid>_mask.npz``) or
            ``"gt_then_pred"`` (NIfTI where the study has one, else the prediction).
        cache_dir: output folder (also holds ``crop_config.yaml`` and ``cache_index.csv``).
        cfg: crop settings; must match those the folder was built with.
        pred_mask_dir: folder of stage-1 masks, for ``"pred"`` and ``"gt_then_pred"``.
        split: ``"train"`` or ``"test"`` image folder.
        num_workers: parallel processes (0 = in this process).

    Returns:
        One row per study, in ``uids`` order: StudyInstanceUID, path, status (built | cached | failed), mask_source,
        n_present, has_boxes, error. Also written to ``cache_index.csv``.
    """
    from rsna_cspine.io.kaggle import read_bounding_boxes

    if mask_source not in MASK_SOURCES:
        raise ConfigError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
    cfg.validate()
    cache_dir = Path(cache_dir)
    _check_settings(cache_dir, cfg)
    boxes_by_uid: dict[str, np.ndarray] = {}
    if split == "train" and layout.bounding_boxes_csv.is_file():  # type: ignore[attr-defined]
        boxes = read_bounding_boxes(layout.bounding_boxes_csv)  # type: ignore[attr-defined]
        columns = ["slice_number", "x", "y", "width", "height"]
        boxes_by_uid = {uid: g[columns].to_numpy(np.float64) for uid, g in boxes.groupby("StudyInstanceUID")}

    rows: list[dict[str, object]] = []
    todo = []
    for uid in dict.fromkeys(uids):  # keeps order, drops duplicates
        path = crop_path(cache_dir, uid)
        if path.is_file():
            rows.append({"StudyInstanceUID": uid, "path": str(path), "status": "cached", "error": ""})
        else:
            args = (str(layout.root), uid, split, mask_source, None if pred_mask_dir is None else str(pred_mask_dir),  # type: ignore[attr-defined]
                    str(path), cfg, boxes_by_uid.get(uid))
            todo.append(args)
    if todo:
        bar = tqdm(total=len(todo), desc="crops", unit="study", disable=None)
        if num_workers > 0:
            with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
                for row in pool.map(_build_one, *zip(*todo)):
                    rows.append(row)
                    bar.update()
        else:
            for args in todo:
                rows.append(_build_one(*args))
                bar.update()
        bar.close()
    order = {uid: i for i, uid in enumerate(dict.fromkeys(uids))}
    rows.sort(key=lambda r: order[str(r["StudyInstanceUID"])])
    index = pd.DataFrame(rows).reindex(columns=list(INDEX_COLUMNS))
    failed = index[index["status"] == "failed"]
    for _, row in failed.iterrows():
        log.error("crop cache: %s failed: %s", row["StudyInstanceUID"], row["error"])
    if len(failed):
        log.warning("crop cache: %d of %d studies failed and are skipped", len(failed), len(index))
    index.to_csv(cache_dir / INDEX_FILE, index=False)
    return index

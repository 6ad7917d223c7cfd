"""Crop cache: one ``<uid>.npz`` per study holding its seven vertebra stacks and slice-level labels.

Building crops means decoding a whole DICOM series, so it is done once per study and reused by every
epoch and fold. The studies go through the project's :class:`~rsna_cspine.runner.StudyRunner`: the
cache is resumable (``<cache>/finished/`` records each built study), a study that fails is logged and
listed but does not stop the others, and the crop settings are the ledger's fingerprint, so that a
cache built with other settings is refused rather than silently reused. Crop files written without the
ledger (by hand, or before it) are kept when their stacks have the cache's shape and no older settings
file (``crop_config.yaml``) says otherwise.
"""

from __future__ import annotations

import logging
import zipfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pandas as pd
import yaml

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
from rsna_cspine.io.files import atomic_open, atomic_write_text
from rsna_cspine.io.volume import Volume
from rsna_cspine.runner import LEDGER_FOLDER, StudyLedger, StudyRunner

if TYPE_CHECKING:
    from rsna_cspine.io.kaggle import KaggleLayout

log = logging.getLogger(__name__)

MASK_SOURCES: tuple[str, ...] = ("gt", "pred", "gt_then_pred")
#: How slice labels were drawn from the boxes; recorded so a cache built under another rule is refused.
SLICE_LABEL_RULE = "box slice in the vertebra's range and box rectangle touching its mask; box maps in crop pixels"
INDEX_FILE = "cache_index.csv"
#: Where caches built before the ledger recorded their crop settings.
LEGACY_SETTINGS_FILE = "crop_config.yaml"
INDEX_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "path", "status", "mask_source", "n_present", "has_boxes", "error")
#: zlib level of crop files. Compressing is most of a study's preparation time at numpy's level 6: on the
#: crops of one study (15 slices × 5 channels × 224 px) level 1 took a sixth of the CPU time for 11 % more
#: bytes (1.1 s vs 6.0 s, 13.1 vs 11.8 MB, on the shared 2-core machine under load).
CROP_ZLIB_LEVEL = 1


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
    # One archive member per vertebra: a training item then decompresses only its own stack.
    arrays = {f"images_{name}": crops.images[i] for i, name in enumerate(VERTEBRAE)}
    arrays.update(present=crops.present, slice_index=crops.slice_index, z_range=crops.z_range, boxes=crops.boxes,
                  slice_labels=crops.slice_labels, box_maps=crops.box_maps, mask_source=np.array(mask_source))
    with atomic_open(path, "wb") as fh:
        _savez(fh, arrays)
    return path


def _savez(fh: BinaryIO, arrays: dict[str, np.ndarray], level: int = CROP_ZLIB_LEVEL) -> None:
    """``np.savez_compressed`` with a chosen zlib level (numpy's own has no such argument): the same
    ``.npz`` layout, one ``<name>.npy`` member per array, read back by ``np.load``."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


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


def crop_cache_fingerprint(cfg: CropConfig) -> dict[str, object]:
    """What decides a crop cache's files: the crop settings and the slice-label rule (its ledger fingerprint).

    Args:
        cfg: the crop settings.
    """
    return {**to_dict(cfg), "slice_label_rule": SLICE_LABEL_RULE}


def legacy_settings_match(cache_dir: str | Path, settings: dict[str, object]) -> bool:
    """Whether crop files written before the ledger may be kept: no settings file of that time
    (``crop_config.yaml``) or one that records ``settings``. A setting since retired counts as recorded
    when it holds its neutral value (the crops are the same).

    Args:
        cache_dir: the crop cache folder.
        settings: :func:`crop_cache_fingerprint` of the run.
    """
    legacy = Path(cache_dir) / LEGACY_SETTINGS_FILE
    if not legacy.is_file():
        return True
    found = yaml.safe_load(legacy.read_text()) or {}
    found = {k: v for k, v in found.items() if not (k in RETIRED_CROP_SETTINGS and RETIRED_CROP_SETTINGS[k] == v)}
    return found == settings


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


def study_crops(volume: Volume, mask: np.ndarray, cfg: CropConfig, boxes: np.ndarray | None) -> VertebraCrops:
    """One study's seven stacks with their slice labels and box maps: the per-study step of
    :func:`build_crop_cache` and ``rsna-cspine prepare``.

    Args:
        volume: the decoded study.
        mask: label map aligned with it (1..7 = C1..C7; other values are ignored).
        cfg: crop settings.
        boxes: the study's ``(n, 5)`` rows ``(slice_number, x, y, width, height)`` of
            ``train_bounding_boxes.csv``, or None (slice labels unknown).
    """
    crops = extract_vertebra_crops(volume.hu, mask, cfg, spacing=volume.spacing)
    box_z, box_rects = _box_slices(volume, boxes)
    crops.slice_labels = slice_labels_from_boxes(crops, box_z, cfg.half_width, box_rects, mask)
    crops.box_maps = box_maps_from_boxes(crops, box_z, cfg.half_width, box_rects, mask)
    return crops


def boxes_by_study(layout: KaggleLayout, split: str = "train") -> dict[str, np.ndarray]:
    """uid → ``(n, 5)`` rows ``(slice_number, x, y, width, height)`` of ``train_bounding_boxes.csv``
    (empty for the test split or a layout without the file).

    Args:
        layout: the Kaggle-layout dataset.
        split: ``train`` or ``test``.
    """
    from rsna_cspine.io.kaggle import read_bounding_boxes

    if split != "train" or not layout.bounding_boxes_csv.is_file():
        return {}
    boxes = read_bounding_boxes(layout.bounding_boxes_csv)
    columns = ["slice_number", "x", "y", "width", "height"]
    return {uid: g[columns].to_numpy(np.float64) for uid, g in boxes.groupby("StudyInstanceUID")}


def _adopt_crop_file(cache_dir: Path, cfg: CropConfig, uid: str) -> dict[str, object] | None:
    """A crop file written outside the ledger (by hand, or before it): kept when its stacks have this shape."""
    path = crop_path(cache_dir, uid)
    try:
        with np.load(path) as data:
            shape = data[f"images_{VERTEBRAE[0]}"].shape
            record = {"path": str(path), "mask_source": str(data["mask_source"]), "n_present": int(data["present"].sum()),
                      "outputs": [str(path)]}
    except Exception:  # noqa: BLE001 - missing, partial or unreadable: build it again
        return None
    return record if shape == (cfg.n_slices, cfg.in_chans, cfg.size, cfg.size) else None


def _crop_study(
    uid: str,
    layout_root: str,
    split: str,
    mask_source: str,
    pred_mask_dir: str | None,
    cache_dir: str,
    cfg: CropConfig,
    boxes_by_uid: dict[str, np.ndarray],
) -> dict[str, object]:
    """Load, crop and save one study; its ledger record (module level: worker processes run it)."""
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.io.study import load_study

    study_boxes = boxes_by_uid.get(uid)
    volume = load_study(KaggleLayout(Path(layout_root)).study_path(uid, split))
    mask, used = _load_mask(layout_root, uid, volume, mask_source, pred_mask_dir)
    crops = study_crops(volume, mask, cfg, study_boxes)
    path = save_crops(crop_path(cache_dir, uid), crops, mask_source=used)
    return {"path": str(path), "mask_source": used, "n_present": int(crops.present.sum()),
            "has_boxes": study_boxes is not None, "outputs": [str(path)]}


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
        cache_dir: output folder (also holds ``finished/`` and ``cache_index.csv``).
        cfg: crop settings; must match those the folder was built with.
        pred_mask_dir: folder of stage-1 masks, for ``"pred"`` and ``"gt_then_pred"``.
        split: ``"train"`` or ``"test"`` image folder.
        num_workers: parallel processes (0 = in this process).

    Returns:
        One row per study, in ``uids`` order: StudyInstanceUID, path, status (built | cached | failed), mask_source,
        n_present, has_boxes, error. Also written to ``cache_index.csv``.
    """
    if mask_source not in MASK_SOURCES:
        raise ConfigError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
    cfg.validate()
    cache_dir = Path(cache_dir)
    settings = crop_cache_fingerprint(cfg)
    trusted = legacy_settings_match(cache_dir, settings)
    ledger = StudyLedger(cache_dir / LEDGER_FOLDER, settings, on_change="refuse",
                         adopt=partial(_adopt_crop_file, cache_dir, cfg) if trusted else None)
    boxes_by_uid = boxes_by_study(layout, split)  # type: ignore[arg-type]
    root = str(layout.root)  # type: ignore[attr-defined]
    work = partial(_crop_study, layout_root=root, split=split, mask_source=mask_source, cache_dir=str(cache_dir),
                   pred_mask_dir=None if pred_mask_dir is None else str(pred_mask_dir), cfg=cfg,
                   boxes_by_uid=boxes_by_uid)
    report = StudyRunner(ledger, workers=num_workers, desc="crops").run(uids, work)

    status = {"done": "built", "resumed": "cached", "failed": "failed"}
    rows = [
        (o.uid, str(crop_path(cache_dir, o.uid)), status[o.status], (o.record or {}).get("mask_source", ""),
         (o.record or {}).get("n_present", 0), o.uid in boxes_by_uid, o.reason)
        for o in report.outcomes
    ]
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    if report.failures:
        log.warning("crop cache: %d of %d studies failed and are skipped", len(report.failures), len(index))
    atomic_write_text(cache_dir / INDEX_FILE, index.to_csv(index=False))
    return index

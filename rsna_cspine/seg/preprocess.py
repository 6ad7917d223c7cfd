"""Volume → network input: HU window, resampling to a fixed grid, and the per-study training cache.

Every study is resampled to one grid (e.g. 128³) whatever its slice count and in-plane size, as the
top RSNA 2022 teams did; the aspect distortion is the same for training and prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from rsna_cspine.constants import CERVICAL_LABELS, THORACIC_LABELS
from rsna_cspine.io.files import atomic_open
from rsna_cspine.io.volume import Volume
from rsna_cspine.io.window import window_hu

if TYPE_CHECKING:
    from rsna_cspine.io.kaggle import KaggleLayout

DEFAULT_HU_WINDOW: tuple[float, float] = (-400.0, 1600.0)
THORACIC_MODES: tuple[str, ...] = ("background", "class")
#: Bumped when the cache format or the preprocessing changes, so stale files are rebuilt.
CACHE_VERSION: int = 1


def nearest_indices(n_source: int, n_target: int) -> np.ndarray:
    """Source index sampled by each target index under centre-aligned nearest-neighbour resampling.

    Target voxel ``i`` covers ``[i, i+1) * n_source / n_target`` in source units; it takes the source
    voxel containing its centre. The same rule maps labels down to the grid and masks back up, so a
    mask predicted on the grid lands where its image came from.

    Args:
        n_source: length of the axis being sampled.
        n_target: length of the resampled axis.
    """
    idx = np.floor((np.arange(n_target) + 0.5) * (n_source / n_target)).astype(np.int64)
    return np.clip(idx, 0, n_source - 1)


def resample_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 3-D array (labels) to ``shape`` by index lookup (no float copy).

    Args:
        array: ``(z, y, x)`` array of any dtype.
        shape: target ``(D, H, W)``.
    """
    idx = [nearest_indices(n, m) for n, m in zip(array.shape, shape)]
    return array[np.ix_(*idx)]


def fold_labels(labels: np.ndarray, thoracic: str = "background") -> np.ndarray:
    """RSNA label values → training classes: 1..7 = C1..C7, thoracic → 0 or 8, anything else → 0.

    Args:
        labels: uint8 label map with RSNA values (1..7 cervical, 8..19 thoracic).
        thoracic: ``background`` or ``class``.
    """
    if thoracic not in THORACIC_MODES:
        raise ValueError(f"thoracic must be one of {THORACIC_MODES}, got {thoracic!r}")
    out = np.where(np.isin(labels, CERVICAL_LABELS), labels, 0).astype(np.uint8)
    if thoracic == "class":
        out[np.isin(labels, THORACIC_LABELS)] = 8
    return out


def num_classes(thoracic: str) -> int:
    """Output channels of the network (background + C1..C7 [+ thoracic])."""
    return 9 if thoracic == "class" else 8


def _resize_axis_pair(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def preprocess_volume(
    volume: Volume,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
    chunk_slices: int = 32,
) -> np.ndarray:
    """HU → window clipped to [0, 1] → resampled to ``grid``; returns float32 ``(1, D, H, W)``.

    Resampling is linear and separable: each chunk of slices is resized in-plane first, then the small
    stack is resized along z. Without antialiasing this equals one trilinear interpolation, but it never
    holds a float copy of the full-resolution volume (a 512×512×700 study is 730 MB); with antialiasing
    (the default) thin cortex is averaged into the grid voxel instead of being skipped by point sampling.

    Args:
        volume: the loaded study (``hu`` float32 ``(z, y, x)``).
        grid: target ``(D, H, W)``.
        hu_window: ``(low, high)`` HU mapped to 0 and 1.
        antialias: area-like averaging when shrinking an axis.
        chunk_slices: slices normalised and resized in-plane at a time (bounds memory).
    """
    depth, height, width = (int(g) for g in grid)
    hu = volume.hu
    planes = []
    for start in range(0, hu.shape[0], chunk_slices):
        block = window_hu(torch.as_tensor(np.asarray(hu[start : start + chunk_slices], dtype=np.float32)), hu_window)
        block = block.unsqueeze(1)  # (n, 1, y, x)
        planes.append(_resize_axis_pair(block, (height, width), antialias)[:, 0])
    stack = torch.cat(planes, dim=0)  # (z, H, W), small
    # Resize z as the first axis of a 2-D image whose second axis (x) keeps its size.
    by_row = stack.permute(1, 0, 2).unsqueeze(1)  # (H, 1, z, W)
    out = _resize_axis_pair(by_row, (depth, width), antialias)[:, 0].permute(1, 0, 2)  # (D, H, W)
    return out.unsqueeze(0).contiguous().numpy().astype(np.float32, copy=False)


def _adopt_cache_file(cache_dir: Path, settings: dict[str, object], uid: str) -> dict[str, list[str]] | None:
    """A cache file written outside the ledger (an earlier version): kept when it records these settings."""
    path = cache_dir / f"{uid}.npz"
    try:
        with np.load(path) as npz:
            stored = {"version": int(npz["version"]), "grid": [int(v) for v in npz["grid"]],
                      "hu_window": [float(v) for v in npz["hu_window"]], "antialias": bool(npz["antialias"])}
    except Exception:  # noqa: BLE001 - missing, partial or unreadable: build it again
        return None
    return {"outputs": [str(path)]} if stored == settings else None


def cache_training_study(
    layout: KaggleLayout,
    uid: str,
    cache_dir: str | Path,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
) -> Path:
    """Decode one labelled training study and store it at grid resolution as ``<cache_dir>/<uid>.npz``.

    The file holds ``image`` (float16 ``(1, D, H, W)``), ``labels`` (uint8 ``(D, H, W)``, RSNA values so
    the thoracic option can change without re-decoding), ``original_shape``, ``spacing`` and the
    preprocessing settings. Which files are current is :func:`build_cache`'s ledger's business.

    Args:
        layout: the Kaggle-layout dataset.
        uid: StudyInstanceUID with a segmentation.
        cache_dir: output folder.
        grid: target ``(D, H, W)``.
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
    """
    from rsna_cspine.errors import LayoutError
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.io.study import load_study

    seg_path = layout.segmentation_path(uid)
    if seg_path is None:
        raise LayoutError(f"study {uid} has no segmentation", layout.segmentations)
    volume = load_study(layout.study_path(uid, "train"))  # a DICOM folder, or an imported NIfTI / Enhanced CT file
    return write_stage1_input(Path(cache_dir) / f"{uid}.npz", volume, load_segmentation(seg_path, volume), grid,
                              hu_window, antialias=antialias)[0]


def write_stage1_input(
    path: str | Path,
    volume: Volume,
    labels: np.ndarray | None,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
) -> tuple[Path, np.ndarray]:
    """One study's stage-1 input (the volume on the grid, and its labels there when it has any), written
    as a cache file; the same per-study step for :func:`build_cache` and ``rsna-cspine prepare``.

    Args:
        path: destination ``.npz``.
        volume: the decoded study.
        labels: RSNA label map aligned with the volume, or None (a study without a segmentation).
        grid: target ``(D, H, W)``.
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.

    Returns:
        The file, and the preprocessed image (float32 ``(1, D, H, W)``; stage-1 prediction can reuse it).
    """
    image = preprocess_volume(volume, grid, hu_window, antialias=antialias)
    grid_labels = None if labels is None else resample_nearest(labels, grid)
    written = write_cache_file(path, image, grid_labels, volume.shape, volume.spacing, hu_window, antialias=antialias)
    return written, image


def write_cache_file(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray | None,
    original_shape: Sequence[int],
    spacing: Sequence[float],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
) -> Path:
    """Atomically write one grid-resolution study in the cache format read by :func:`load_cached_study`.

    Args:
        path: destination ``.npz``.
        image: float ``(1, D, H, W)`` preprocessed image.
        labels: ``(D, H, W)`` RSNA label values at grid resolution; None for a study without a
            segmentation (the file then has no ``labels`` and cannot train stage 1).
        original_shape: ``(z, y, x)`` of the source volume.
        spacing: ``(dz, dy, dx)`` of the source volume in mm.
        hu_window: window the image was made with.
        antialias: whether the image was resampled with antialiasing.
    """
    path = Path(path)
    if image.ndim != 4 or (labels is not None and image.shape[1:] != labels.shape):
        raise ValueError(f"{path}: image {image.shape} and labels {None if labels is None else labels.shape} do not match")
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(
            fh,
            image=image.astype(np.float16),
            **({} if labels is None else {"labels": labels.astype(np.uint8)}),
            original_shape=np.asarray(original_shape, dtype=np.int64),
            spacing=np.asarray(spacing, dtype=np.float64),
            grid=np.asarray(image.shape[1:], dtype=np.int64),
            hu_window=np.asarray(hu_window, dtype=np.float64),
            antialias=np.asarray(antialias),
            version=np.asarray(CACHE_VERSION),
        )
    return path


def cache_fingerprint(grid: Sequence[int], hu_window: Sequence[float], antialias: bool) -> dict[str, object]:
    """What decides a stage-1 cache file (its ledger fingerprint).

    Args:
        grid: target ``(D, H, W)``.
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
    """
    return {"version": CACHE_VERSION, "grid": [int(g) for g in grid], "hu_window": [float(h) for h in hu_window],
            "antialias": bool(antialias)}


def build_cache(
    layout: KaggleLayout,
    uids: Sequence[str],
    cache_dir: str | Path,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """Cache every study through the project's :class:`~rsna_cspine.runner.StudyRunner`.

    Resumable: ``<cache_dir>/finished/`` records each cached study under the preprocessing settings;
    a study cached with the same settings whose file exists is skipped (a file written before the
    ledger is kept when it records the same settings), other settings rebuild everything. A study that
    fails is logged, listed in ``cache_failures.csv`` and skipped.

    Args:
        layout: the Kaggle-layout dataset.
        uids: studies to cache (each needs a segmentation).
        cache_dir: output folder (also receives ``cache_failures.csv``).
        grid: target ``(D, H, W)``.
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
        progress: show a tqdm bar.

    Returns:
        uid → cached file, for the studies that are cached (now or before).
    """
    from rsna_cspine.runner import LEDGER_FOLDER, StudyLedger, StudyRunner

    cache_dir = Path(cache_dir)
    settings = cache_fingerprint(grid, hu_window, antialias)
    ledger = StudyLedger(cache_dir / LEDGER_FOLDER, settings, adopt=partial(_adopt_cache_file, cache_dir, settings))
    runner = StudyRunner(ledger, desc="seg cache", progress=progress, failures_csv=cache_dir / "cache_failures.csv")

    def cache_one(uid: str) -> dict[str, list[str]]:
        return {"outputs": [str(cache_training_study(layout, uid, cache_dir, grid, hu_window, antialias=antialias))]}

    report = runner.run(uids, cache_one)
    return {uid: Path(record["outputs"][0]) for uid, record in report.records.items()}


def load_cached_study(path: str | Path, thoracic: str = "background") -> dict[str, np.ndarray]:
    """Read one cache file as float32 ``image`` (1, D, H, W) and folded uint8 ``label`` (1, D, H, W).

    Args:
        path: a file written by :func:`cache_training_study`.
        thoracic: how thoracic labels are folded (see :func:`fold_labels`).
    """
    from rsna_cspine.errors import CSpineError

    with np.load(path) as npz:
        if "labels" not in npz:
            raise CSpineError("holds no label map (the study has no segmentation), so it cannot train stage 1", path)
        image = npz["image"].astype(np.float32)
        label = fold_labels(npz["labels"], thoracic)[None]
    return {"image": image, "label": label}

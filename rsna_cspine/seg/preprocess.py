"""Volume → network input: HU window, resampling to a fixed grid, and the per-study training cache.

Without the cascade every study is resampled to one grid (e.g. 128³) whatever its slice count and
in-plane size, as the top RSNA 2022 teams did; the aspect distortion is the same for training and
prediction. With it (``data.spacing``, :mod:`rsna_cspine.seg.boxes`), the grid covers a box of fixed
size in mm around the neck, and the coarse pass sees the whole study at a fixed coarse spacing.
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
from rsna_cspine.seg.boxes import (
    CascadeGeometry,
    VoxelBox,
    box_size,
    coarse_shape,
    label_centre,
    nearest_indices,
    read_box,
    sample_labels,
    size_scale,
)
from rsna_cspine.seg.masks import mask_table, neck_length_mm

if TYPE_CHECKING:
    from rsna_cspine.io.kaggle import KaggleLayout

DEFAULT_HU_WINDOW: tuple[float, float] = (-400.0, 1600.0)
THORACIC_MODES: tuple[str, ...] = ("background", "class")
#: Bumped when the cache format or the preprocessing changes, so stale files are rebuilt.
CACHE_VERSION: int = 2


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
    chunk_slices: int = 16,
    box: VoxelBox | None = None,
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
        chunk_slices: slices normalised and resized in-plane at a time (bounds memory). 16 keeps a chunk
            of 512² float32 slices (16 MiB) under glibc's largest mmap threshold (32 MiB), so the chunks'
            buffers are reused from the heap rather than mapped and zeroed afresh by the kernel each time
            (32 slices: ~0.5 M more page faults and ~1 CPU-s more system time per 500-slice study); the values
            do not depend on it.
        box: resample only this box of the volume (the cascade's fine pass); voxels outside the
            volume read as the window's low end (air). Default: the whole volume.
    """
    depth, height, width = (int(g) for g in grid)
    box = box or VoxelBox.whole(volume.shape)
    planes = []
    for start in range(0, box.size[0], chunk_slices):
        stop = min(start + chunk_slices, box.size[0])
        hu = read_box(volume.hu, box, float(hu_window[0]), (start, stop))  # outside the scan: air
        block = window_hu(torch.as_tensor(np.asarray(hu, dtype=np.float32)), hu_window).unsqueeze(1)  # (n, 1, y, x)
        planes.append(_resize_axis_pair(block, (height, width), antialias)[:, 0])
    stack = torch.cat(planes, dim=0)  # (z, H, W), small
    # Resize z as the first axis of a 2-D image whose second axis (x) keeps its size.
    by_row = stack.permute(1, 0, 2).unsqueeze(1)  # (H, 1, z, W)
    out = _resize_axis_pair(by_row, (depth, width), antialias)[:, 0].permute(1, 0, 2)  # (D, H, W)
    return out.unsqueeze(0).contiguous().numpy().astype(np.float32, copy=False)


def _stored_settings(npz: np.lib.npyio.NpzFile) -> dict[str, object]:
    """The preprocessing settings a cache file records (the form of :func:`cache_fingerprint`)."""
    stored: dict[str, object] = {"version": int(npz["version"]), "grid": [int(v) for v in npz["grid"]],
                                 "hu_window": [float(v) for v in npz["hu_window"]], "antialias": bool(npz["antialias"])}
    for key in ("spacing", "box_margin_mm", "localiser_spacing", "reference_neck_mm"):
        if f"cascade_{key}" in npz:
            stored[key] = [float(v) for v in npz[f"cascade_{key}"]]
    return stored


def _adopt_cache_file(cache_dir: Path, settings: dict[str, object], uid: str) -> dict[str, list[str]] | None:
    """A cache file written outside the ledger (an earlier version): kept when it records these settings."""
    path = cache_dir / f"{uid}.npz"
    try:
        with np.load(path) as npz:
            stored = _stored_settings(npz)
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
    cascade: CascadeGeometry | None = None,
) -> Path:
    """Decode one labelled training study and store its stage-1 inputs (:func:`write_stage1_input`) as
    ``<cache_dir>/<uid>.npz``. Which files are current is :func:`build_cache`'s ledger's business.

    Args:
        layout: the Kaggle-layout dataset.
        uid: StudyInstanceUID with a segmentation.
        cache_dir: output folder.
        grid: network input ``(D, H, W)`` (of the fine pass with ``cascade``).
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
        cascade: the cascade's spacings and margins; None for the whole-volume grid.
    """
    from rsna_cspine.errors import LayoutError
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.io.study import load_study

    seg_path = layout.segmentation_path(uid)
    if seg_path is None:
        raise LayoutError(f"study {uid} has no segmentation", layout.segmentations)
    volume = load_study(layout.study_path(uid, "train"))  # a DICOM folder, or an imported NIfTI / Enhanced CT file
    return write_stage1_input(Path(cache_dir) / f"{uid}.npz", volume, load_segmentation(seg_path, volume), grid,
                              hu_window, antialias=antialias, cascade=cascade)[0]


def write_stage1_input(
    path: str | Path,
    volume: Volume,
    labels: np.ndarray | None,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
    cascade: CascadeGeometry | None = None,
) -> tuple[Path, np.ndarray | None]:
    """One study's stage-1 input, written as a cache file: the same per-study step for :func:`build_cache`
    and ``rsna-cspine prepare``.

    Without ``cascade``: the volume on the grid, and its labels there when it has any. With it, the
    cascade's two inputs: ``image``/``labels`` are the fine box (``grid`` plus ``cascade.margin_mm`` on each
    side, at ``cascade.spacing``) centred on the labelled cervical spine (on the volume's centre when none
    is in view or the study has no labels) and scaled to the neck's length (``cascade.reference_neck_mm``,
    :func:`~rsna_cspine.seg.boxes.size_scale`; ``size_scale`` records the factor), ``box`` its
    ``[start, size]`` in original voxels, and
    ``loc_image``/``loc_labels`` the whole study at ``cascade.localiser_spacing``.

    Args:
        path: destination ``.npz``.
        volume: the decoded study.
        labels: RSNA label map aligned with the volume, or None (a study without a segmentation).
        grid: network input ``(D, H, W)`` (of the fine pass with ``cascade``).
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
        cascade: the cascade's spacings and margins; None for the whole-volume grid.

    Returns:
        The file, and the preprocessed image a whole-volume stage-1 model can reuse (float32
        ``(1, D, H, W)``); None with ``cascade``, whose fine box is placed on the true labels, not where a
        localiser would put it.
    """
    if cascade is None:
        image = preprocess_volume(volume, grid, hu_window, antialias=antialias)
        grid_labels = None if labels is None else resample_nearest(labels, grid)
        written = write_cache_file(path, image, grid_labels, volume.shape, volume.spacing, hu_window,
                                   antialias=antialias)
        return written, image
    stored = tuple(int(g) + 2 * m for g, m in zip(grid, cascade.margin_voxels()))
    centre = None if labels is None else label_centre(labels, CERVICAL_LABELS)
    centre = centre or tuple((n - 1) / 2.0 for n in volume.shape)
    coarse = coarse_shape(volume.shape, volume.spacing, cascade.localiser_spacing)
    scale = 1.0
    if labels is not None and cascade.reference_neck_mm > 0:  # measured as prediction measures its own labels
        table = mask_table(np.where(labels <= max(CERVICAL_LABELS), labels, 0).astype(np.uint8))
        scale = size_scale(neck_length_mm(table, volume.shape[0], volume.spacing[0]), cascade.reference_neck_mm)
    box = VoxelBox.centred(centre, box_size(volume.spacing, stored, tuple(v * scale for v in cascade.spacing)))
    extra = {
        "grid": np.asarray(grid, dtype=np.int64), "box": np.asarray(box.to_list(), dtype=np.int64),
        "size_scale": np.asarray(scale, dtype=np.float64),
        "loc_image": preprocess_volume(volume, coarse, hu_window, antialias=antialias).astype(np.float16),
        **{f"cascade_{key}": np.asarray(value, dtype=np.float64) for key, value in cascade.settings().items()},
    }
    if labels is not None:
        extra["loc_labels"] = resample_nearest(labels, coarse).astype(np.uint8)
    written = write_cache_file(
        path, preprocess_volume(volume, stored, hu_window, antialias=antialias, box=box),
        None if labels is None else sample_labels(labels, box, stored), volume.shape, volume.spacing, hu_window,
        antialias=antialias, **extra,
    )
    return written, None


def write_cache_file(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray | None,
    original_shape: Sequence[int],
    spacing: Sequence[float],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
    **extra: np.ndarray,
) -> Path:
    """Atomically write one study in the cache format read by :func:`load_cached_study`.

    Args:
        path: destination ``.npz``.
        image: float ``(1, D, H, W)`` preprocessed image.
        labels: ``(D, H, W)`` RSNA label values at the image's resolution; None for a study without a
            segmentation (the file then has no ``labels`` and cannot train stage 1).
        original_shape: ``(z, y, x)`` of the source volume.
        spacing: ``(dz, dy, dx)`` of the source volume in mm.
        hu_window: window the image was made with.
        antialias: whether the image was resampled with antialiasing.
        **extra: further arrays (the cascade's; ``grid`` replaces the image's shape as the recorded grid).
    """
    path = Path(path)
    if image.ndim != 4 or (labels is not None and image.shape[1:] != labels.shape):
        raise ValueError(f"{path}: image {image.shape} and labels {None if labels is None else labels.shape} do not match")
    arrays = {
        "image": image.astype(np.float16),
        **({} if labels is None else {"labels": labels.astype(np.uint8)}),
        "original_shape": np.asarray(original_shape, dtype=np.int64),
        "spacing": np.asarray(spacing, dtype=np.float64),
        "grid": np.asarray(image.shape[1:], dtype=np.int64),
        "hu_window": np.asarray(hu_window, dtype=np.float64),
        "antialias": np.asarray(antialias),
        "version": np.asarray(CACHE_VERSION),
    }
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, **{**arrays, **extra})
    return path


def cache_fingerprint(
    grid: Sequence[int], hu_window: Sequence[float], antialias: bool, cascade: CascadeGeometry | None = None
) -> dict[str, object]:
    """What decides a stage-1 cache file (its ledger fingerprint).

    Args:
        grid: network input ``(D, H, W)``.
        hu_window: HU window of :func:`preprocess_volume`.
        antialias: see :func:`preprocess_volume`.
        cascade: the cascade's spacings and margins (None: whole-volume grid).
    """
    settings: dict[str, object] = {"version": CACHE_VERSION, "grid": [int(g) for g in grid],
                                   "hu_window": [float(h) for h in hu_window], "antialias": bool(antialias)}
    return {**settings, **(cascade.settings() if cascade is not None else {})}


def build_cache(
    layout: KaggleLayout,
    uids: Sequence[str],
    cache_dir: str | Path,
    grid: Sequence[int],
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    *,
    antialias: bool = True,
    progress: bool = True,
    cascade: CascadeGeometry | None = None,
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
        cascade: the cascade's spacings and margins (None: whole-volume grid).

    Returns:
        uid → cached file, for the studies that are cached (now or before).
    """
    from rsna_cspine.runner import LEDGER_FOLDER, StudyLedger, StudyRunner

    cache_dir = Path(cache_dir)
    settings = cache_fingerprint(grid, hu_window, antialias, cascade)
    ledger = StudyLedger(cache_dir / LEDGER_FOLDER, settings, adopt=partial(_adopt_cache_file, cache_dir, settings))
    runner = StudyRunner(ledger, desc="seg cache", progress=progress, failures_csv=cache_dir / "cache_failures.csv")

    def cache_one(uid: str) -> dict[str, list[str]]:
        path = cache_training_study(layout, uid, cache_dir, grid, hu_window, antialias=antialias, cascade=cascade)
        return {"outputs": [str(path)]}

    report = runner.run(uids, cache_one)
    return {uid: Path(record["outputs"][0]) for uid, record in report.records.items()}


def load_cached_study(
    path: str | Path, thoracic: str = "background", localiser: bool = False, dtype: type = np.float32
) -> dict[str, np.ndarray]:
    """Read one cache file as ``image`` (1, D, H, W) and folded uint8 ``label`` (1, D, H, W).

    Args:
        path: a file written by :func:`cache_training_study`.
        thoracic: how thoracic labels are folded (see :func:`fold_labels`).
        localiser: read the cascade's coarse input instead, labelled 1 for any cervical vertebra.
        dtype: of the image (float16, as stored, halves what a loader keeps in memory).
    """
    from rsna_cspine.errors import CSpineError

    with np.load(path) as npz:
        wanted = "loc_labels" if localiser else "labels"
        if wanted not in npz:
            what = ("no localiser input (written without the cascade, or for a study without a segmentation)"
                    if localiser else "no label map (the study has no segmentation), so it cannot train stage 1")
            raise CSpineError(f"holds {what}", path)
        if localiser:
            image = npz["loc_image"].astype(dtype)
            label = np.isin(npz["loc_labels"], CERVICAL_LABELS).astype(np.uint8)[None]
        else:
            image = npz["image"].astype(dtype)
            label = fold_labels(npz["labels"], thoracic)[None]
    return {"image": image, "label": label}

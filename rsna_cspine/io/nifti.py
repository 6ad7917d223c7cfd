"""Segmentation NIfTI ↔ label arrays aligned voxel-for-voxel with a :class:`Volume`.

Alignment is derived from geometry, never from a hard-coded flip: the NIfTI affine (RAS, as nibabel
reports it) is converted to LPS and composed with ``Volume.affine`` into the index map
``M = inv(nifti_lps) @ volume.affine`` (volume index ``(z, y, x)`` → NIfTI index). When ``M`` is a
signed axis permutation with integer offsets the labels are copied exactly with transpose / flip /
slicing; otherwise they are resampled nearest-neighbour, with a warning.

Writing uses the RSNA storage convention (sagittal-first): stored axis 0 is the image column ``x``,
axis 1 the image row ``y`` reversed, axis 2 the slice axis reversed relative to instance order, which
is what the public recipe ``get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)`` undoes.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from rsna_cspine.errors import NiftiError
from rsna_cspine.io.volume import Volume

logger = logging.getLogger(__name__)

#: RAS ↔ LPS: negate the first two world axes (the matrix is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Largest drift (in NIfTI voxels, anywhere in the volume) for which the index map still counts as
#: an exact axis permutation. Below 0.5 nearest-neighbour resampling would pick the same voxels.
_EXACT_TOLERANCE_VOXELS = 0.25
#: Smallest fraction of the volume's voxels that must fall inside the NIfTI grid.
MIN_OVERLAP = 0.9
#: Labels are stored as uint8.
_MAX_STORABLE_LABEL = 255


class SegmentationWarning(UserWarning):
    """A segmentation was loaded but repaired (resampled, unknown labels zeroed, empty, ...)."""


def load_segmentation(path: str | Path, volume: Volume, *, max_label: int | None = 19) -> np.ndarray:
    """Read a label NIfTI and align it with ``volume``.

    Args:
        path: ``.nii`` or ``.nii.gz`` label map.
        volume: the study it annotates; its affine defines the output grid.
        max_label: largest valid label (RSNA: 19 = T12); larger, negative or non-integer values are
            reported and set to 0. None keeps every label that fits in uint8.

    Returns:
        uint8 array with ``volume.shape`` (z, y, x).

    Raises:
        NiftiError: unreadable file, data not 3-D, grids that do not overlap (less than
            :data:`MIN_OVERLAP` of the volume inside the NIfTI), or a shape mismatch under an exact
            axis mapping.
    """
    path = Path(path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types on missing / corrupt files
        raise NiftiError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiError(f"expected 3-D label data, got shape {data.shape}", path)
    try:
        index_map = np.linalg.inv(RAS_TO_LPS @ image.affine) @ volume.affine
    except np.linalg.LinAlgError as exc:
        raise NiftiError(f"singular affine {image.affine.tolist()}", path) from exc
    permutation = _as_axis_permutation(index_map, volume.shape)
    if permutation is not None:
        aligned = _copy_exact(data, permutation, volume.shape, path)
    else:
        aligned = _resample_nearest(data, index_map, volume.shape, path)
    return _clean_labels(aligned, max_label, path)


def save_segmentation(labels: np.ndarray, volume: Volume, path: str | Path, *, rsna_layout: bool = True) -> None:
    """Write ``labels`` (aligned with ``volume``) as a NIfTI whose affine places them in the patient.

    Args:
        labels: integer array with ``volume.shape`` (z, y, x), values 0..255.
        volume: the study the labels belong to.
        path: output ``.nii`` or ``.nii.gz``.
        rsna_layout: store sagittal-first like the RSNA files (see module docstring); False stores
            ``(x, y, z)`` in volume order.

    Raises:
        NiftiError: wrong shape or values that do not fit uint8.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise NiftiError(f"labels shape {labels.shape} differs from the volume's {volume.shape}", path)
    if labels.size and (labels.min() < 0 or labels.max() > _MAX_STORABLE_LABEL):
        raise NiftiError(f"labels must be in 0..{_MAX_STORABLE_LABEL}, got {labels.min()}..{labels.max()}", path)
    n_z, n_y, _ = volume.shape
    # storage index (i, j, k) → volume index (z, y, x), as a 4×4 matrix
    storage_to_volume = np.zeros((4, 4))
    storage_to_volume[3, 3] = 1.0
    storage_to_volume[2, 0] = 1.0  # x = i
    stored = labels.transpose(2, 1, 0)
    if rsna_layout:
        stored = stored[:, ::-1, :]
        storage_to_volume[1, 1], storage_to_volume[1, 3] = -1.0, n_y - 1  # y = Y-1-j
        # Stored slices run against instance (file-number) order; z follows the file numbers
        # unless they decrease from superior to inferior.
        if volume.reversed_numbering:
            storage_to_volume[0, 2] = 1.0  # z = k
        else:
            stored = stored[:, :, ::-1]
            storage_to_volume[0, 2], storage_to_volume[0, 3] = -1.0, n_z - 1  # z = Z-1-k
    else:
        storage_to_volume[1, 1] = 1.0  # y = j
        storage_to_volume[0, 2] = 1.0  # z = k
    affine = RAS_TO_LPS @ volume.affine @ storage_to_volume
    image = nib.Nifti1Image(np.ascontiguousarray(stored, dtype=np.uint8), affine)
    image.set_sform(affine, code=1)
    # qform cannot hold a shear (gantry tilt); sform alone then carries the geometry.
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    image.set_qform(affine if np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6) else None, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _as_axis_permutation(index_map: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The 4×4 integer map (signed permutation + integer offset) equal to ``index_map`` within
    :data:`_EXACT_TOLERANCE_VOXELS` over the whole volume, or None when there is none."""
    rounded = np.round(index_map)
    rotation = rounded[:3, :3]
    is_permutation = (
        np.all(np.isin(rotation, (-1.0, 0.0, 1.0)))
        and np.all(np.abs(rotation).sum(axis=0) == 1)
        and np.all(np.abs(rotation).sum(axis=1) == 1)
    )
    if not is_permutation:
        return None
    # The drift is affine in the index, so its largest value over the volume is at a corner.
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape])]).T
    drift = np.abs((index_map - rounded)[:3] @ corners).max()
    return rounded if drift <= _EXACT_TOLERANCE_VOXELS else None


def _copy_exact(data: np.ndarray, permutation: np.ndarray, shape: tuple[int, int, int], path: Path) -> np.ndarray:
    """Realise an axis permutation with transpose, flips and slicing (no interpolation)."""
    source_axes = [int(np.flatnonzero(permutation[:3, a])[0]) for a in range(3)]
    expected = tuple(data.shape[b] for b in source_axes)
    if expected != shape:
        raise NiftiError(
            f"NIfTI shape {data.shape} (as {expected} after matching axes) differs from the volume's {shape}", path
        )
    source = data.transpose(source_axes)
    out_slices, in_slices = [], []
    inside = 1.0
    for a, b in enumerate(source_axes):
        step, first = int(permutation[b, a]), int(permutation[b, 3])
        # output indices i with 0 <= first + step * i < n
        n = shape[a]
        i_values = np.arange(n)
        valid = np.flatnonzero((first + step * i_values >= 0) & (first + step * i_values < n))
        inside *= len(valid) / n
        if len(valid) == 0:
            break
        i0, i1 = int(valid[0]), int(valid[-1]) + 1
        j0, j1 = first + step * i0, first + step * (i1 - 1)
        out_slices.append(slice(i0, i1))
        in_slices.append(slice(j0, j1 + 1) if step > 0 else slice(j0, j1 - 1 if j1 > 0 else None, -1))
    if inside < MIN_OVERLAP:
        raise NiftiError(f"only {inside:.0%} of the volume lies inside the NIfTI grid (need {MIN_OVERLAP:.0%})", path)
    if inside < 1.0:
        _warn(f"NIfTI grid is shifted against the volume: {1 - inside:.1%} of the volume left unlabelled", path)
    out = np.zeros(shape, dtype=data.dtype)
    out[tuple(out_slices)] = source[tuple(in_slices)]
    return out


def _resample_nearest(data: np.ndarray, index_map: np.ndarray, shape: tuple[int, int, int], path: Path) -> np.ndarray:
    inside = _overlap_fraction(index_map, shape, data.shape)
    if inside < MIN_OVERLAP:
        raise NiftiError(f"only {inside:.0%} of the volume lies inside the NIfTI grid (need {MIN_OVERLAP:.0%})", path)
    _warn("NIfTI grid is not an axis permutation of the volume grid: labels resampled nearest-neighbour", path)
    source = data if data.dtype.kind in "biu" else np.asarray(data, dtype=np.float32)
    return ndimage.affine_transform(
        source, index_map[:3, :3], offset=index_map[:3, 3], output_shape=shape, order=0, mode="constant", cval=0
    )


def _overlap_fraction(index_map: np.ndarray, shape: tuple[int, int, int], source_shape: tuple[int, ...]) -> float:
    """Fraction of volume voxels whose centre maps inside the NIfTI grid (estimated on a 32³ lattice)."""
    axes = [np.linspace(0, n - 1, min(n, 32)) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    mapped = grid @ index_map[:3, :3].T + index_map[:3, 3]
    upper = np.asarray(source_shape[:3], dtype=float) - 0.5
    return float(np.mean(np.all((mapped >= -0.5) & (mapped < upper), axis=1)))


def _clean_labels(aligned: np.ndarray, max_label: int | None, path: Path) -> np.ndarray:
    limit = _MAX_STORABLE_LABEL if max_label is None else min(max_label, _MAX_STORABLE_LABEL)
    if aligned.dtype == np.uint8:
        counts = np.bincount(aligned.ravel(), minlength=256)
        unknown = [int(v) for v in np.flatnonzero(counts[limit + 1 :]) + limit + 1]
        labels = aligned
        if unknown:
            labels = np.where(aligned > limit, 0, aligned).astype(np.uint8)
    elif aligned.dtype.kind in "iub":
        bad = (aligned < 0) | (aligned > limit)
        unknown = [int(v) for v in np.unique(aligned[bad])]
        labels = np.where(bad, 0, aligned).astype(np.uint8)
    else:  # float storage: a label must also be a whole number
        rounded = np.round(aligned)
        bad = ~np.isfinite(aligned) | (rounded < 0) | (rounded > limit) | (np.abs(aligned - rounded) > 1e-3)
        unknown = [float(v) for v in np.unique(aligned[bad])]
        labels = np.where(bad, 0, rounded).astype(np.uint8)
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        _warn(f"label values outside 0..{limit} set to 0: {shown}", path)
    if not labels.any():
        _warn("segmentation is empty over the volume (all zeros)", path)
    return labels


def _warn(message: str, path: Path) -> None:
    logger.warning("%s: %s", path, message)
    warnings.warn(f"{path}: {message}", SegmentationWarning, stacklevel=3)

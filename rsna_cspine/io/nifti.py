"""NIfTI ↔ the project's arrays: a CT volume read as a :class:`Volume`; label maps aligned voxel-for-voxel with one.

Alignment is derived from geometry, never from a hard-coded flip: the NIfTI affine (RAS, as nibabel
reports it) is converted to LPS; nibabel's orientation tools (``io_orientation``, ``ornt_transform``,
``apply_orientation``) bring the label axes into the volume's order and sense, and when what is left of
the index map ``M = inv(nifti_lps) @ volume.affine`` (volume index ``(z, y, x)`` → NIfTI index) is a
whole-voxel shift the labels are copied exactly; otherwise they are resampled nearest-neighbour, with
a warning.

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
from nibabel import orientations
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
#: Largest in-plane matrix of a CT volume (as for a DICOM slice: 8192² is far above any CT).
_MAX_SLICE_PIXELS = 8192 * 8192
#: The project's axes in LPS, as nibabel's ``io_orientation`` writes them: z along -S (superior first),
#: y along +P (rows anterior → posterior), x along +L (columns right → left), as an axial DICOM slice.
_AXIAL_LPS = np.array([[2, -1], [1, 1], [0, 1]], dtype=float)


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
    nifti_lps = RAS_TO_LPS @ image.affine
    if not np.all(np.isfinite(nifti_lps)):
        raise NiftiError(f"non-finite affine {image.affine.tolist()}", path)
    try:
        index_map = np.linalg.inv(nifti_lps) @ volume.affine
    except np.linalg.LinAlgError as exc:
        raise NiftiError(f"singular affine {image.affine.tolist()}", path) from exc
    aligned = _copy_exact(data, nifti_lps, volume, path)
    if aligned is None:
        aligned = _resample_nearest(data, index_map, volume.shape, path)
    return _clean_labels(aligned, max_label, path)


def load_nifti_volume(path: str | Path) -> Volume:
    """Read a CT stored as NIfTI (``.nii``, ``.nii.gz``) as a :class:`Volume` in the project's frame.

    HU are the stored values through the file's scaling (``scl_slope``, ``scl_inter``). The geometry is
    the file's affine (sform, else qform; RAS) turned to LPS; nibabel's orientation tools permute and
    flip the axes, without interpolation, so that the array is ``(z, y, x)`` with ``z`` from superior to
    inferior, rows running anterior → posterior and columns right → left, as in an axial DICOM series.

    Args:
        path: the file.

    Returns:
        The volume; ``slice_numbers`` are the slices' voxel indices along the file's own axis, ``files``
        the file name, ``study_uid`` the file name without its ending. ``warnings`` lists the checks that
        found something odd.

    Raises:
        NiftiError: unreadable file, not a 3-D image, a singular or non-finite affine, non-orthogonal
            in-plane axes, an implausible matrix, or values that are not finite.
    """
    from rsna_cspine.io.volume import study_name

    path = Path(path)
    notes: list[str] = []
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError(f"{type(image).__name__} is not a NIfTI image")
        shape = tuple(int(n) for n in image.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise NiftiError(f"expected a 3-D image, got shape {image.shape}", path)
        if min(shape) < 1 or sorted(shape)[1] * sorted(shape)[2] > _MAX_SLICE_PIXELS:
            raise NiftiError(f"implausible image shape {shape}", path)
        hu = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32).reshape(shape)
    except NiftiError:
        raise
    except Exception as exc:  # nibabel raises several types on missing / corrupt files
        raise NiftiError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path) from exc
    affine = np.asarray(image.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise NiftiError(f"singular or non-finite affine {affine.round(4).tolist()}", path)
    if int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0:
        notes.append("neither sform nor qform is set: geometry taken from the voxel sizes alone")
    bad = ~np.isfinite(hu)
    if bad.any():
        raise NiftiError(f"{int(bad.sum())} voxel value(s) are not finite (NaN or infinite)", path)

    reoriented, lps = _reorient(hu, RAS_TO_LPS @ affine, _AXIAL_LPS)
    hu = np.ascontiguousarray(reoriented)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    col_cosine, row_cosine = lps[:3, 1] / spacing[1], lps[:3, 2] / spacing[2]
    if abs(float(row_cosine @ col_cosine)) > 1e-2:
        raise NiftiError(f"in-plane axes are not orthogonal (cosines {row_cosine.round(3)}, {col_cosine.round(3)})",
                         path)
    normal = np.cross(row_cosine, col_cosine)
    tilt = float(np.degrees(np.arccos(np.clip(abs(normal @ lps[:3, 0]) / spacing[0], 0.0, 1.0))))
    if tilt > 0.1:
        notes.append(f"sheared grid: slices step {tilt:.2f}° off the slice normal (data kept, volume is sheared)")
    if hu.size and (float(hu.min()) > -500 or float(hu.max()) < 300):
        notes.append(f"values from {float(hu.min()):g} to {float(hu.max()):g} do not look like Hounsfield units "
                     "(air near -1000, bone above 300)")
    n_slices = hu.shape[0]
    positions = (lps @ np.column_stack([np.arange(n_slices), np.zeros((n_slices, 2)), np.ones(n_slices)]).T)[:3].T
    # The voxel index along the file's own axis that became z: what a slice is called in the file.
    source = np.linalg.inv(RAS_TO_LPS @ affine) @ lps
    axis = int(np.argmax(np.abs(source[:3, 0])))
    numbers = np.round(source[axis, 3] + source[axis, 0] * np.arange(n_slices)).astype(np.int64)
    for note in notes:
        logger.warning("%s: %s", path, note)
    return Volume(
        hu=hu,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        positions=positions,
        row_cosine=row_cosine,
        col_cosine=col_cosine,
        slice_numbers=numbers,
        files=[path.name] * n_slices,
        reversed_numbering=bool(n_slices > 1 and numbers[1] < numbers[0]),
        study_uid=study_name(path),
        warnings=notes,
    )


def save_volume_nifti(volume: Volume, path: str | Path) -> Path:
    """Write a volume's HU as a NIfTI CT whose affine places it in the patient (read back by :func:`load_nifti_volume`).

    Stored ``(x, y, z)`` in volume order, as int16 when every value is a whole number in its range (CT
    always is), else float32.

    Args:
        volume: the study.
        path: output ``.nii`` or ``.nii.gz``.
    """
    path = Path(path)
    hu = volume.hu
    whole = hu.size == 0 or (float(hu.min()) >= -32768 and float(hu.max()) <= 32767 and bool(np.all(hu == np.round(hu))))
    stored = np.ascontiguousarray(hu.transpose(2, 1, 0), dtype=np.int16 if whole else np.float32)
    storage_to_volume = np.zeros((4, 4))
    storage_to_volume[2, 0] = storage_to_volume[1, 1] = storage_to_volume[0, 2] = storage_to_volume[3, 3] = 1.0
    affine = RAS_TO_LPS @ volume.affine @ storage_to_volume
    image = nib.Nifti1Image(stored, affine)
    image.set_sform(affine, code=1)
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    image.set_qform(affine if np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6) else None, code=1)
    image.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


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


def _exact_shift(index_map: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The integer offset of ``index_map`` when it is the identity plus an integer shift within
    :data:`_EXACT_TOLERANCE_VOXELS` over the whole volume, else None."""
    rounded = np.round(index_map)
    if not np.array_equal(rounded[:3, :3], np.eye(3)):
        return None
    # The drift is affine in the index, so its largest value over the volume is at a corner.
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in shape])]).T
    drift = np.abs((index_map - rounded)[:3] @ corners).max()
    return rounded[:3, 3].astype(int) if drift <= _EXACT_TOLERANCE_VOXELS else None


def _reorient(data: np.ndarray, affine: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` with its axes permuted and flipped to the world orientation ``target`` (nibabel's
    ``io_orientation`` form), and the affine of the result (views, no interpolation)."""
    transform = orientations.ornt_transform(orientations.io_orientation(affine), target)
    return orientations.apply_orientation(data, transform), affine @ orientations.inv_ornt_aff(transform, data.shape)


def _copy_exact(
    data: np.ndarray, nifti_lps: np.ndarray, volume: Volume, path: Path
) -> np.ndarray | None:
    """The labels on the volume's grid when the two grids differ only by axis order, flips and a whole-voxel
    shift (nibabel's orientation tools do the axes); None when they do not."""
    shape = volume.shape
    source, affine = _reorient(data, nifti_lps, orientations.io_orientation(volume.affine))
    shift = _exact_shift(np.linalg.inv(affine) @ volume.affine, shape)
    if shift is None:
        return None
    if source.shape != shape:
        raise NiftiError(
            f"NIfTI shape {data.shape} (as {source.shape} after matching axes) differs from the volume's {shape}", path
        )
    # output index i reads source index i + shift on each axis, where that is inside the grid
    out_slices = tuple(slice(max(0, -d), min(n, n - d)) for d, n in zip(shift, shape))
    in_slices = tuple(slice(max(0, d), min(n, n + d)) for d, n in zip(shift, shape))
    inside = float(np.prod([max(0, s.stop - s.start) / n for s, n in zip(out_slices, shape)]))
    if inside < MIN_OVERLAP:
        raise NiftiError(f"only {inside:.0%} of the volume lies inside the NIfTI grid (need {MIN_OVERLAP:.0%})", path)
    if inside < 1.0:
        _warn(f"NIfTI grid is shifted against the volume: {1 - inside:.1%} of the volume left unlabelled", path)
    out = np.zeros(shape, dtype=data.dtype)
    out[out_slices] = source[in_slices]
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
        # The maximum first: counting every value (np.bincount) would cast the map to int64, a temporary of
        # 8 bytes per voxel (1 GB for 500 slices of 512²) whose fresh pages cost more than the count itself.
        unknown = [int(v) for v in np.unique(aligned[aligned > limit])] if aligned.max(initial=0) > limit else []
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

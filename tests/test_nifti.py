"""Segmentation NIfTI alignment: real TotalSegmentator files, synthetic round trips, error cases."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.paths import REAL_DATA
from rsna_cspine.errors import NiftiError
from rsna_cspine.io.dicom import load_series
from rsna_cspine.io.nifti import RAS_TO_LPS, SegmentationWarning, load_segmentation, save_segmentation
from rsna_cspine.io.volume import Volume

REAL = REAL_DATA / "totalsegmentator"
SHAPE = (12, 20, 16)


def make_volume(
    shape: tuple[int, int, int] = SHAPE,
    *,
    spacing: tuple[float, float, float] = (1.5, 0.8, 0.7),
    origin: tuple[float, float, float] = (-30.0, -40.0, 100.0),
    reversed_numbering: bool = False,
    tilt_mm_per_slice: float = 0.0,
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0),
) -> Volume:
    """An axial volume, superior first, as load_series would return it."""
    n = shape[0]
    positions = np.array([[origin[0], origin[1] + tilt_mm_per_slice * z, origin[2] - spacing[0] * z] for z in range(n)])
    numbers = np.arange(n, 0, -1) if reversed_numbering else np.arange(1, n + 1)
    return Volume(
        hu=np.zeros(shape, dtype=np.float32),
        spacing=spacing,
        positions=positions,
        row_cosine=np.array(row_cosine),
        col_cosine=np.array([0.0, 1.0, 0.0]),
        slice_numbers=numbers,
        files=[f"{k}.dcm" for k in numbers],
        reversed_numbering=reversed_numbering,
    )


@contextlib.contextmanager
def no_segmentation_warning() -> Iterator[None]:
    """Fail on any SegmentationWarning: the exact alignment path must be silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SegmentationWarning)
        yield


def random_labels(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, shape).astype(np.uint8)


def write_nifti(path: Path, data: np.ndarray, affine_ras: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine_ras), path)
    return path


def volume_grid_nifti(volume: Volume, labels_zyx: np.ndarray, path: Path) -> Path:
    """Labels stored (x, y, z) with an affine built independently from the volume geometry."""
    affine_lps = volume.affine[:, [2, 1, 0, 3]]  # storage index (x, y, z) → volume index (z, y, x) → LPS
    return write_nifti(path, labels_zyx.transpose(2, 1, 0).copy(), RAS_TO_LPS @ affine_lps)


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real_pair():
    if not REAL.is_dir():
        pytest.skip("real test files not available")
    volume = load_series(REAL / "example_ct_dicom", workers=1)
    labels = load_segmentation(REAL / "example_seg_dicom.nii.gz", volume, max_label=None)
    return volume, labels


def within_label_spread(labels: np.ndarray, hu: np.ndarray) -> float:
    """Voxel-weighted mean HU standard deviation inside each label: low when labels sit on organs."""
    values = [l for l in np.unique(labels) if l]
    spreads = [hu[labels == l].std() for l in values]
    weights = [np.count_nonzero(labels == l) for l in values]
    return float(np.average(spreads, weights=weights))


def test_real_labels_land_on_anatomy(real_pair):
    volume, labels = real_pair
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    stored = np.asarray(nib.load(REAL / "example_seg_dicom.nii.gz").dataobj)
    assert set(np.unique(labels)) == set(np.unique(stored))  # TotalSegmentator ids up to 117 kept
    inside = volume.hu[labels > 0]
    assert -150 < inside.mean() < 250  # organs, vessels, bone: soft tissue or denser
    assert np.mean(inside < -500) < 0.05  # almost no labelled air
    assert volume.hu[labels == 0].mean() < -500  # what is left is mostly air around the body


def test_real_alignment_beats_every_flip(real_pair):
    volume, labels = real_pair
    aligned = within_label_spread(labels, volume.hu)
    for axes in [(0,), (1,), (2,), (0, 1), (1, 2)]:
        assert aligned < 0.8 * within_label_spread(np.flip(labels, axes), volume.hu), axes


def test_real_file_agrees_with_the_public_rsna_recipe(real_pair):
    # This file is stored like the RSNA ones; the recipe gives instance order, which here is
    # superior first (InstanceNumber grows towards the feet), i.e. our z order.
    volume, labels = real_pair
    assert volume.reversed_numbering is False
    recipe = np.asarray(nib.load(REAL / "example_seg_dicom.nii.gz").dataobj)[:, ::-1, ::-1].transpose(2, 1, 0)
    np.testing.assert_array_equal(labels, recipe)


def test_real_default_max_label_zeroes_foreign_ids(real_pair):
    volume, full = real_pair
    with pytest.warns(SegmentationWarning, match="outside 0..19 set to 0: 20, 32"):
        rsna_range = load_segmentation(REAL / "example_seg_dicom.nii.gz", volume)
    np.testing.assert_array_equal(rsna_range, np.where(full > 19, 0, full))


# --------------------------------------------------------------------------- synthetic round trips


@pytest.mark.parametrize("rsna_layout", [True, False])
@pytest.mark.parametrize(
    "volume",
    [
        make_volume(),
        make_volume(reversed_numbering=True),
        make_volume(origin=(12.5, -3.25, -700.0), spacing=(2.0, 0.5, 0.5)),
        make_volume(row_cosine=(-1.0, 0.0, 0.0)),
        make_volume(tilt_mm_per_slice=0.4),
    ],
    ids=["plain", "reversed", "shifted", "mirrored-rows", "tilted"],
)
def test_round_trip_is_exact(tmp_path, volume, rsna_layout):
    labels = random_labels(seed=1)
    path = tmp_path / "seg.nii.gz"
    save_segmentation(labels, volume, path, rsna_layout=rsna_layout)
    with no_segmentation_warning():
        loaded = load_segmentation(path, volume)
    np.testing.assert_array_equal(loaded, labels)
    assert loaded.dtype == np.uint8


@pytest.mark.parametrize("reversed_numbering", [False, True])
def test_saved_file_follows_the_rsna_storage_convention(tmp_path, reversed_numbering):
    volume = make_volume(reversed_numbering=reversed_numbering)
    labels = random_labels(seed=2)
    path = tmp_path / "seg.nii"
    save_segmentation(labels, volume, path)
    stored = nib.load(path).get_fdata()
    assert stored.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # sagittal-first: (x, y, slice)
    instance_order = stored[:, ::-1, ::-1].transpose(2, 1, 0)  # the public recipe
    expected = labels[::-1] if reversed_numbering else labels  # labels in file-number order
    np.testing.assert_array_equal(instance_order, expected)


def test_loader_aligns_an_independently_written_grid(tmp_path):
    volume = make_volume(reversed_numbering=True)
    labels = random_labels(seed=3)
    path = volume_grid_nifti(volume, labels, tmp_path / "xyz.nii.gz")
    with no_segmentation_warning():
        np.testing.assert_array_equal(load_segmentation(path, volume), labels)


def test_finer_grid_is_resampled_nearest_with_warning(tmp_path):
    volume = make_volume()
    labels = random_labels(seed=4)
    fine = labels.repeat(2, axis=1).repeat(2, axis=2)  # y and x at twice the resolution
    affine_lps = volume.affine @ np.diag([1.0, 0.5, 0.5, 1.0])
    # fine index (z, y', x') sits at volume index (z, y'/2, x'/2): even fine indices hit voxel centres
    affine_ras = RAS_TO_LPS @ affine_lps[:, [2, 1, 0, 3]]  # stored (x, y, z)
    path = write_nifti(tmp_path / "fine.nii.gz", fine.transpose(2, 1, 0).copy(), affine_ras)
    with pytest.warns(SegmentationWarning, match="resampled nearest-neighbour"):
        loaded = load_segmentation(path, volume)
    np.testing.assert_array_equal(loaded, labels)


# --------------------------------------------------------------------------- refusals and repairs


def test_wrong_shape_raises_naming_the_file(tmp_path):
    volume = make_volume()
    path = volume_grid_nifti(make_volume(shape=(11, 20, 16)), random_labels((11, 20, 16)), tmp_path / "short.nii.gz")
    with pytest.raises(NiftiError, match="differs from the volume") as info:
        load_segmentation(path, volume)
    assert "short.nii.gz" in str(info.value)


def test_non_overlapping_affine_raises(tmp_path):
    volume = make_volume()
    elsewhere = make_volume(origin=(-30.0, -40.0, 900.0))
    path = volume_grid_nifti(elsewhere, random_labels(), tmp_path / "far.nii.gz")
    with pytest.raises(NiftiError, match="inside the NIfTI grid"):
        load_segmentation(path, volume)


def test_one_slice_shift_is_filled_with_background_and_warned(tmp_path):
    volume = make_volume()
    labels = random_labels(seed=5)
    shifted = make_volume(origin=(-30.0, -40.0, 100.0 - 1.5))  # the NIfTI starts one slice lower
    path = volume_grid_nifti(shifted, labels, tmp_path / "shift.nii.gz")
    with pytest.warns(SegmentationWarning, match="shifted"):
        loaded = load_segmentation(path, volume)
    np.testing.assert_array_equal(loaded[1:], labels[:-1])
    assert not loaded[0].any()


def test_unknown_label_values_are_zeroed_with_warning(tmp_path):
    volume = make_volume()
    labels = random_labels(seed=6)
    labels[0, 0, :3] = [25, 200, 19]
    path = volume_grid_nifti(volume, labels, tmp_path / "odd.nii.gz")
    with pytest.warns(SegmentationWarning, match="outside 0..19 set to 0: 25, 200"):
        loaded = load_segmentation(path, volume)
    assert loaded[0, 0, :3].tolist() == [0, 0, 19]
    np.testing.assert_array_equal(loaded[1:], labels[1:])


def test_float_storage_with_fractional_values(tmp_path):
    volume = make_volume()
    labels = random_labels(seed=7).astype(np.float32)
    labels[3, 4, 5] = 2.5
    path = volume_grid_nifti(volume, labels, tmp_path / "float.nii.gz")
    with pytest.warns(SegmentationWarning, match="2.5"):
        loaded = load_segmentation(path, volume)
    assert loaded[3, 4, 5] == 0
    expected = labels.astype(np.uint8)
    expected[3, 4, 5] = 0
    np.testing.assert_array_equal(loaded, expected)


def test_empty_mask_warns(tmp_path):
    volume = make_volume()
    path = volume_grid_nifti(volume, np.zeros(SHAPE, dtype=np.uint8), tmp_path / "empty.nii.gz")
    with pytest.warns(SegmentationWarning, match="empty"):
        loaded = load_segmentation(path, volume)
    assert loaded.shape == SHAPE and not loaded.any()


def test_unreadable_and_non_3d_files_raise(tmp_path):
    volume = make_volume()
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti at all")
    with pytest.raises(NiftiError, match="cannot read") as info:
        load_segmentation(garbage, volume)
    assert "garbage.nii.gz" in str(info.value)
    with pytest.raises(NiftiError, match="cannot read"):
        load_segmentation(tmp_path / "missing.nii", volume)
    flat = write_nifti(tmp_path / "flat.nii", np.zeros((16, 20), dtype=np.uint8), np.eye(4))
    with pytest.raises(NiftiError, match="3-D"):
        load_segmentation(flat, volume)
    series = write_nifti(tmp_path / "4d.nii", np.zeros((16, 20, 12, 2), dtype=np.uint8), np.eye(4))
    with pytest.raises(NiftiError, match="3-D"):
        load_segmentation(series, volume)


def test_save_refuses_wrong_shape_or_values(tmp_path):
    volume = make_volume()
    with pytest.raises(NiftiError, match="shape"):
        save_segmentation(np.zeros((3, 3, 3), dtype=np.uint8), volume, tmp_path / "x.nii")
    with pytest.raises(NiftiError, match="0..255"):
        save_segmentation(np.full(SHAPE, 300), volume, tmp_path / "x.nii")

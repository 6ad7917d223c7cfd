"""A CT stored as NIfTI → Volume: HU through the file's scaling, the patient frame from its affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.paths import REAL_DATA
from rsna_cspine.errors import NiftiError
from rsna_cspine.io.nifti import RAS_TO_LPS, load_nifti_volume, save_volume_nifti
from rsna_cspine.io.study import find_studies, load_study

TS_DICOM = REAL_DATA / "totalsegmentator" / "example_ct_dicom"


def write(path: Path, data: np.ndarray, affine: np.ndarray, slope: float | None = None, inter: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def world_lps(affine_ras: np.ndarray, ijk) -> np.ndarray:
    """LPS position of a stored voxel, from the file's affine alone."""
    return (RAS_TO_LPS @ affine_ras @ np.array([*ijk, 1.0]))[:3]


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA"], ids=lambda c: c)
def test_any_storage_orientation_becomes_superior_first_axial(tmp_path, axcodes) -> None:
    # A 6 × 7 × 8 grid stored along the axes ``axcodes`` names (PIR: sagittal-first, like VerSe files).
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 2000, size=(6, 7, 8)).astype(np.int16)
    codes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    spacing = (0.8, 0.9, 1.5)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, code in enumerate(axcodes):
        world, sign = codes[code]
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = (12.0, -30.0, 45.0)
    path = write(tmp_path / f"{axcodes}.nii.gz", data, affine)

    volume = load_nifti_volume(path)

    # z runs superior → inferior, rows anterior → posterior, columns right → left (LPS +x, +y, -z).
    np.testing.assert_allclose(volume.row_cosine, [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(volume.col_cosine, [0, 1, 0], atol=1e-9)
    assert np.all(np.diff(volume.positions[:, 2]) < 0)
    # Every voxel sits where the file's own affine puts it, with the same value.
    for ijk in [(0, 0, 0), (5, 6, 7), (2, 3, 4), (5, 0, 7)]:
        target = world_lps(affine, ijk)
        zyx = np.round(np.linalg.inv(volume.affine) @ np.append(target, 1.0))[:3].astype(int)
        assert volume.hu[tuple(zyx)] == data[ijk]
        np.testing.assert_allclose(volume.affine @ np.append(zyx, 1.0), np.append(target, 1.0), atol=1e-6)
    assert volume.study_uid == axcodes and volume.warnings == []


def test_scaling_gives_hounsfield_units(tmp_path) -> None:
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4) * 100
    volume = load_nifti_volume(write(tmp_path / "scaled.nii", stored, np.diag([1.0, 1.0, 2.0, 1.0]), 2.0, -1024.0))
    assert volume.hu.dtype == np.float32
    assert volume.hu.min() == -1024.0 and volume.hu.max() == 2 * 2300 - 1024.0
    assert volume.spacing == pytest.approx((2.0, 1.0, 1.0))


def test_values_that_are_not_hounsfield_units_are_reported(tmp_path) -> None:
    volume = load_nifti_volume(write(tmp_path / "unit.nii.gz", np.random.default_rng(0).random((3, 4, 5)).astype(np.float32),
                                     np.eye(4)))
    assert any("do not look like Hounsfield units" in w for w in volume.warnings)


@pytest.mark.parametrize(
    ("data", "affine", "match"),
    [
        (np.zeros((4, 5), np.int16), np.eye(4), "expected a 3-D image"),
        (np.full((2, 3, 4), np.nan, np.float32), np.eye(4), "not finite"),
        (np.zeros((2, 3, 4), np.int16), np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    ],
    ids=["2d", "nan", "singular"],
)
def test_implausible_files_raise_naming_the_file(tmp_path, data, affine, match) -> None:
    path = tmp_path / "bad.nii"
    image = nib.Nifti1Image(data, np.eye(4))
    image.set_qform(None, code=0)
    nib.save(image, path)
    with path.open("r+b") as file:  # the sform rows (bytes 280-327) as a damaged file has them
        file.seek(280)
        file.write(np.asarray(affine[:3], dtype="<f4").tobytes())
    with pytest.raises(NiftiError, match=match) as info:
        load_nifti_volume(path)
    assert str(path) in str(info.value)


def test_unreadable_file_raises_naming_it(tmp_path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file at all")
    with pytest.raises(NiftiError, match="cannot read NIfTI") as info:
        load_study(path)
    assert str(path) in str(info.value)


def test_real_dicom_series_written_as_nifti_reads_back_identically(tmp_path) -> None:
    if not TS_DICOM.is_dir():
        pytest.skip("real TotalSegmentator example not present")
    dicom = load_study(TS_DICOM, workers=1)
    path = save_volume_nifti(dicom, tmp_path / "ct.nii.gz")
    assert nib.load(path).get_data_dtype() == np.int16  # whole HU values stored compactly
    nifti = load_study(path)
    np.testing.assert_array_equal(nifti.hu, dicom.hu)
    np.testing.assert_allclose(nifti.affine, dicom.affine, atol=1e-4)


def test_find_studies_expands_folders_and_names_each_study_once(tmp_path) -> None:
    from tests.dicom_factory import axial_positions, random_stored, write_series

    write_series(tmp_path / "in" / "dicom_study", random_stored(3, 4, 5), axial_positions(3))
    (tmp_path / "in" / "dicom_study" / "notes.txt").write_text("not a slice")
    for name in ("b.nii.gz", "a.nii"):
        write(tmp_path / "in" / "niftis" / name, np.zeros((2, 3, 4), np.int16), np.eye(4))
    write(tmp_path / "other" / "a.nii.gz", np.zeros((2, 3, 4), np.int16), np.eye(4))
    (tmp_path / "in" / "README.md").write_text("a folder of studies")

    studies = find_studies([tmp_path / "in", tmp_path / "other" / "a.nii.gz"])

    assert [(s.name, s.kind) for s in studies] == [
        ("dicom_study", "dicom"), ("a", "nifti"), ("b", "nifti"), ("a_2", "nifti")]
    with pytest.raises(Exception, match="does not exist"):
        find_studies([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="holds no study"):
        find_studies([tmp_path / "empty"])

"""Enhanced CT / multi-frame DICOM: one file → the same Volume as the series of slices it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.dicom_factory import axial_positions, random_stored, write_series
from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom import load_series
from rsna_cspine.io.study import load_study
from rsna_cspine.synth.enhanced import write_enhanced_ct

ROWS, COLS = 12, 10


def enhanced_ct_test_file() -> Path:
    """pydicom's Enhanced CT test file, from the installed ``pydicom-data`` package (never downloaded)."""
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("eCT_Supplemental.dcm needs the pydicom-data package (pip install pydicom-data)")
    return Path(path)


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory) -> Path:
    """One study folder written by the synthetic Kaggle-layout writer (uncompressed slices)."""
    from rsna_cspine.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(n_studies=1, seed=5, image_size=40, n_slices=(24, 28), test_fraction=0.0,
                                    compressed_fraction=0.0), progress=False)
    return next((root / "train_images").iterdir())


def assert_same_volume(a, b) -> None:
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.positions, b.positions)
    np.testing.assert_allclose(a.spacing, b.spacing)
    np.testing.assert_allclose(a.row_cosine, b.row_cosine)
    np.testing.assert_allclose(a.col_cosine, b.col_cosine)
    assert a.study_uid == b.study_uid


def test_pydicom_enhanced_ct_file_loads_in_position_order() -> None:
    path = enhanced_ct_test_file()
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    expected_hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]

    volume = load_study(path)

    order = np.argsort(z)[::-1]  # superior (largest LPS z) first
    assert volume.shape == (int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    np.testing.assert_array_equal(volume.hu, expected_hu[order].astype(np.float32))
    np.testing.assert_allclose(volume.positions[:, 2], np.asarray(z)[order])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert volume.spacing == pytest.approx((abs(z[1] - z[0]), *spacing))
    np.testing.assert_allclose(volume.row_cosine, [float(v) for v in
                                                   shared.PlaneOrientationSequence[0].ImageOrientationPatient[:3]])
    assert volume.slice_numbers.tolist() == [int(i) + 1 for i in order]  # frame numbers map the mask back
    assert volume.study_uid == ds.StudyInstanceUID


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless], ids=["native", "rle", "j2k"])
def test_synthetic_series_as_one_enhanced_file_gives_the_same_volume(synthetic_study, tmp_path, syntax) -> None:
    n = len(list(synthetic_study.iterdir()))
    shuffled = np.random.default_rng(0).permutation(n)  # frames in no particular order
    kwargs = {} if syntax is None else {"transfer_syntax": syntax}
    enhanced = write_enhanced_ct(synthetic_study, tmp_path / "ct.dcm", frame_order=shuffled, **kwargs)
    assert int(pydicom.dcmread(enhanced, stop_before_pixels=True).NumberOfFrames) == n

    reference = load_series(synthetic_study, workers=1)
    for workers in (1, 2):  # in-process, and through the worker pool (compressed frames)
        volume = load_study(enhanced, workers=workers)
        assert_same_volume(volume, reference)
    # Each slice keeps its frame number: frame k holds file shuffled[k] + 1.
    frame_of_file = {int(f) + 1: k + 1 for k, f in enumerate(shuffled)}
    assert volume.slice_numbers.tolist() == [frame_of_file[int(n)] for n in reference.slice_numbers]


def test_per_frame_rescale_and_a_folder_holding_the_file(tmp_path) -> None:
    stored = random_stored(6, ROWS, COLS, seed=3)
    slopes, intercepts = [1.0, 2.0, 0.5, 1.0, 1.5, 1.0], [-1024.0, -2048.0, -512.0, -1000.0, -1024.0, 0.0]
    write_series(tmp_path / "slices", stored, axial_positions(6, dz=1.25), slopes=slopes, intercepts=intercepts)
    enhanced = write_enhanced_ct(tmp_path / "slices", tmp_path / "study" / "enhanced.dcm")
    frames = pydicom.dcmread(enhanced).PerFrameFunctionalGroupsSequence
    assert float(frames[1].PixelValueTransformationSequence[0].RescaleSlope) == 2.0  # stored per frame

    expected = stored * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    for source in (enhanced, tmp_path / "study"):  # the file, or the folder it is in
        volume = load_study(source, workers=1)
        np.testing.assert_array_equal(volume.hu, expected.astype(np.float32))
        assert volume.spacing == pytest.approx((1.25, 0.5, 0.5))


def _edited(path: Path, out: Path, edit) -> Path:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_frames_without_positions_are_refused_naming_the_file_and_the_group(tmp_path) -> None:
    write_series(tmp_path / "slices", random_stored(4, ROWS, COLS), axial_positions(4))
    enhanced = write_enhanced_ct(tmp_path / "slices", tmp_path / "ct.dcm")

    def drop_positions(ds) -> None:
        for frame in ds.PerFrameFunctionalGroupsSequence:
            del frame.PlanePositionSequence

    broken = _edited(enhanced, tmp_path / "no_positions.dcm", drop_positions)
    with pytest.raises(DicomSeriesError, match="Plane Position") as info:
        load_study(broken, workers=1)
    assert "no_positions.dcm frame 1" in str(info.value) and str(broken) in str(info.value)


def test_per_frame_item_count_must_match_the_frames(tmp_path) -> None:
    write_series(tmp_path / "slices", random_stored(4, ROWS, COLS), axial_positions(4))
    enhanced = write_enhanced_ct(tmp_path / "slices", tmp_path / "ct.dcm")
    broken = _edited(enhanced, tmp_path / "short.dcm", lambda ds: ds.PerFrameFunctionalGroupsSequence.pop())
    with pytest.raises(DicomSeriesError, match="3 per-frame functional group item"):
        load_study(broken, workers=1)


def test_one_bad_frame_position_is_dropped_and_reported(tmp_path) -> None:
    stored = random_stored(10, ROWS, COLS, seed=4)
    write_series(tmp_path / "slices", stored, axial_positions(10))
    enhanced = write_enhanced_ct(tmp_path / "slices", tmp_path / "ct.dcm")

    def corrupt(ds) -> None:
        ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0].ImagePositionPatient = [0, 0, 1e9]

    volume = load_study(_edited(enhanced, tmp_path / "odd.dcm", corrupt), workers=1)
    assert volume.shape[0] == 9
    assert any("odd.dcm frame 5" in w and "ImagePositionPatient" in w for w in volume.warnings)
    assert any("gap" in w for w in volume.warnings)


def test_a_single_frame_file_is_still_not_a_study(tmp_path) -> None:
    path = write_series(tmp_path, random_stored(1, ROWS, COLS), axial_positions(1))[0]
    with pytest.raises(DicomSeriesError, match="not a folder"):
        load_study(path, workers=1)

"""load_series on small series written with pydicom: ordering, rescale, repairs and refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom import (
    DEFAULT_DECODING_PLUGINS,
    load_series,
    read_slice_header,
    read_slice_hu,
)
from tests.dicom_factory import axial_positions, make_ct_slice, random_stored, save_slice, write_series

ROWS, COLS = 12, 10


def hu_of(stored: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def has_warning(volume, *fragments: str) -> bool:
    return any(all(f in w for f in fragments) for w in volume.warnings)


def test_superior_first_with_increasing_file_numbers(tmp_path):
    stored = random_stored(6, ROWS, COLS, seed=1)
    positions = axial_positions(6, dz=1.25, top=50.0)
    write_series(tmp_path, stored, positions, pixel_spacing=(0.7, 0.6))
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.hu.dtype == np.float32
    assert volume.spacing == pytest.approx((1.25, 0.7, 0.6))
    np.testing.assert_allclose(volume.positions, positions)
    assert volume.slice_numbers.tolist() == [1, 2, 3, 4, 5, 6]
    assert volume.files == [f"{i}.dcm" for i in range(1, 7)]
    assert volume.reversed_numbering is False
    assert volume.study_uid == "1.2.3.4"
    assert volume.warnings == []
    # the affine sends voxel (z, 0, 0) to each slice's ImagePositionPatient
    for z in range(6):
        np.testing.assert_allclose(volume.affine @ [z, 0, 0, 1], [*positions[z], 1])


def test_reversed_numbering_is_put_superior_first(tmp_path):
    stored = random_stored(5, ROWS, COLS, seed=2)
    positions = axial_positions(5)[::-1]  # file 1 is the most inferior slice
    write_series(tmp_path, stored, positions)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[::-1]))
    assert volume.slice_numbers.tolist() == [5, 4, 3, 2, 1]
    assert volume.reversed_numbering is True
    assert np.all(np.diff(volume.positions[:, 2]) < 0)


def test_order_comes_from_positions_not_names(tmp_path):
    rng = np.random.default_rng(3)
    stored = random_stored(7, ROWS, COLS, seed=3)
    positions = axial_positions(7, dz=0.5)
    names = [f"{n}.dcm" for n in rng.permutation(np.arange(100, 107))]
    write_series(tmp_path, stored, positions, names=names)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.files == names
    assert volume.slice_numbers.tolist() == [int(n[:-4]) for n in names]


def test_feet_first_orientation_still_superior_first(tmp_path):
    # Flipped row direction: the slice normal points to the feet; order must still follow patient z.
    stored = random_stored(4, ROWS, COLS, seed=4)
    positions = axial_positions(4, top=10.0)[[2, 0, 3, 1]]
    write_series(tmp_path, stored, positions, orientation=(-1, 0, 0, 0, 1, 0))
    volume = load_series(tmp_path, workers=1)
    assert volume.positions[:, 2].tolist() == [10.0, 9.0, 8.0, 7.0]
    np.testing.assert_array_equal(volume.hu, hu_of(stored[[1, 3, 0, 2]]))


def test_rescale_is_per_slice(tmp_path):
    stored = random_stored(4, ROWS, COLS, seed=5)
    slopes = [1.0, 0.5, 2.0, 1.0]
    intercepts = [-1024.0, -1000.0, 0.0, -3.5]
    write_series(tmp_path, stored, axial_positions(4), slopes=slopes, intercepts=intercepts)
    volume = load_series(tmp_path, workers=1)
    expected = np.stack([hu_of(s, a, b) for s, a, b in zip(stored, slopes, intercepts)])
    np.testing.assert_allclose(volume.hu, expected, rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_signed_and_unsigned_storage(tmp_path, signed):
    stored = random_stored(3, ROWS, COLS, signed=signed, seed=6)
    stored[0, 0, 0] = -2048 if signed else 0  # padding-like extremes survive the rescale
    write_series(tmp_path, stored, axial_positions(3), intercepts=[0.0 if signed else -1024.0] * 3)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored, 1.0, 0.0 if signed else -1024.0))
    assert pydicom.dcmread(tmp_path / "1.dcm").PixelRepresentation == (1 if signed else 0)


@pytest.mark.parametrize("signed", [True, False])
def test_bits_stored_below_allocated_matches_pydicom(tmp_path, signed):
    # 12-bit values with junk in the 4 unused high bits: must be masked / sign-extended as pydicom does.
    rng = np.random.default_rng(7)
    values = rng.integers(-2048, 2048, (ROWS, COLS)) if signed else rng.integers(0, 4096, (ROWS, COLS))
    junk = rng.integers(0, 16, (ROWS, COLS)) << 12
    raw = ((values & 0xFFF) | junk).astype(np.uint16)
    ds = make_ct_slice(values.astype(np.int16 if signed else np.uint16), position=(0, 0, 0), bits_stored=12)
    ds.PixelData = raw.tobytes()
    save_slice(ds, tmp_path / "1.dcm")
    reference = pydicom.dcmread(tmp_path / "1.dcm").pixel_array
    np.testing.assert_array_equal(reference, values)  # pydicom's own reading, the yardstick
    np.testing.assert_array_equal(read_slice_hu(tmp_path / "1.dcm"), values - 1024.0)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLosslessSV1, RLELossless], ids=["j2k", "jpeg-ll", "rle"])
@pytest.mark.parametrize("workers", [1, 2])
def test_compressed_series_equal_uncompressed(tmp_path, syntax, workers):
    # 9 slices ≥ the pool threshold, so workers=2 decodes in processes; the J2K encoder needs ≥ 32²
    stored = random_stored(9, 32, 32, seed=8)
    positions = axial_positions(9)[::-1]
    write_series(tmp_path / "raw", stored, positions)
    write_series(tmp_path / "enc", stored, positions, transfer_syntax=syntax)
    assert read_slice_header(tmp_path / "enc" / "1.dcm").transfer_syntax == syntax
    expected = load_series(tmp_path / "raw", workers=1)
    volume = load_series(tmp_path / "enc", workers=workers)
    np.testing.assert_array_equal(volume.hu, expected.hu)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[::-1]))
    assert volume.warnings == []


def test_decoder_fallback_is_used_and_recorded(tmp_path, monkeypatch):
    stored = random_stored(3, 32, 32, seed=9)
    write_series(tmp_path, stored, axial_positions(3), transfer_syntax=JPEG2000Lossless)
    decoder = get_decoder(JPEG2000Lossless)
    first, second = DEFAULT_DECODING_PLUGINS[:2]

    def broken(src, runner):
        raise RuntimeError(f"simulated {first} failure")

    # pydicom's registry of plugin functions: the first-choice plugin for JPEG 2000 now raises.
    monkeypatch.setitem(decoder._available, first, broken)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert has_warning(volume, "decoder fallback", f"{second} after {first}", f"simulated {first} failure")


def test_single_threaded_decoding_tries_the_pool_workers_decoder_first_with_the_same_values(tmp_path, monkeypatch):
    from rsna_cspine.io.dicom.decode import WORKER_DECODING_PLUGINS, single_threaded_decoding

    stored = random_stored(3, 32, 32, seed=9)
    write_series(tmp_path, stored, axial_positions(3), transfer_syntax=JPEG2000Lossless)
    decoder = get_decoder(JPEG2000Lossless)
    multi_threaded, single = DEFAULT_DECODING_PLUGINS[0], WORKER_DECODING_PLUGINS[JPEG2000Lossless][0]
    assert (multi_threaded, single) == ("gdcm", "pylibjpeg")  # GDCM decodes JPEG 2000 on one thread per CPU

    def refuse(src, runner):
        raise RuntimeError(f"{multi_threaded} was asked")

    monkeypatch.setitem(decoder._available, multi_threaded, refuse)  # a try of GDCM now shows as a fallback
    default = load_series(tmp_path, workers=1)
    assert has_warning(default, "decoder fallback", f"{single} after {multi_threaded}")
    with single_threaded_decoding():
        volume = load_series(tmp_path, workers=1)
    with single_threaded_decoding(False):  # a study with a budget of several threads: the default again
        assert has_warning(load_series(tmp_path, workers=1), "decoder fallback")
    assert volume.warnings == []  # the single-threaded decoder was the first choice
    np.testing.assert_array_equal(volume.hu, default.hu)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert has_warning(load_series(tmp_path, workers=1), "decoder fallback")  # after the block: the default again


def test_non_dicom_file_is_skipped_with_warning(tmp_path):
    stored = random_stored(4, ROWS, COLS, seed=10)
    write_series(tmp_path, stored, axial_positions(4))
    (tmp_path / "README.txt").write_text("not an image\n")
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert has_warning(volume, "non-DICOM", "README.txt")


def test_truncated_file_is_dropped_and_named(tmp_path):
    stored = random_stored(12, ROWS, COLS, seed=11)
    paths = write_series(tmp_path, stored, axial_positions(12))
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[: len(data) - 100])  # cut into the pixel data
    volume = load_series(tmp_path, workers=1, min_valid_fraction=0.9)
    keep = [i for i in range(12) if i != 5]
    np.testing.assert_array_equal(volume.hu, hu_of(stored[keep]))
    assert has_warning(volume, "skipped 1", "6.dcm")
    assert has_warning(volume, "gap")  # the missing slice leaves a 2 mm step


def test_truncated_header_is_dropped_and_named(tmp_path):
    stored = random_stored(12, ROWS, COLS, seed=12)
    paths = write_series(tmp_path, stored, axial_positions(12))
    paths[0].write_bytes(paths[0].read_bytes()[:300])  # preamble intact, header cut short
    volume = load_series(tmp_path, workers=1)
    assert volume.shape == (11, ROWS, COLS)
    assert has_warning(volume, "1.dcm")


def test_file_without_pixel_data_is_dropped_and_named(tmp_path):
    stored = random_stored(11, ROWS, COLS, seed=13)
    paths = write_series(tmp_path, stored, axial_positions(11))
    ds = pydicom.dcmread(paths[-1])
    del ds.PixelData
    ds.save_as(paths[-1])
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[:-1]))
    assert has_warning(volume, "11.dcm", "no pixel data")


def test_too_many_bad_files_raise_naming_folder_and_file(tmp_path):
    stored = random_stored(5, ROWS, COLS, seed=14)
    paths = write_series(tmp_path, stored, axial_positions(5))
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 50])
    with pytest.raises(DicomSeriesError) as info:
        load_series(tmp_path, workers=1, min_valid_fraction=0.9)
    message = str(info.value)
    assert str(tmp_path) in message and "3.dcm" in message and "4 of 5" in message
    # the same folder is accepted when the caller tolerates one bad file in five
    assert load_series(tmp_path, workers=1, min_valid_fraction=0.8).shape == (4, ROWS, COLS)


def test_single_slice(tmp_path):
    stored = random_stored(1, ROWS, COLS, seed=15)
    ds = make_ct_slice(stored[0], position=(1.0, 2.0, 3.0))
    ds.SliceThickness = 2.5
    save_slice(ds, tmp_path / "1.dcm")
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.spacing[0] == 2.5
    assert has_warning(volume, "single slice")
    np.testing.assert_allclose(volume.slice_direction, [0, 0, -1])


def test_empty_and_missing_folders_raise(tmp_path):
    with pytest.raises(DicomSeriesError, match="empty") as info:
        load_series(tmp_path, workers=1)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DicomSeriesError, match="does not exist"):
        load_series(tmp_path / "nope", workers=1)


def test_folder_without_dicom_or_pixels_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DicomSeriesError, match="no readable DICOM"):
        load_series(tmp_path / "a", workers=1)
    paths = write_series(tmp_path / "b", random_stored(3, ROWS, COLS), axial_positions(3))
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    with pytest.raises(DicomSeriesError, match="no pixel data"):
        load_series(tmp_path / "b", workers=1)


def test_duplicate_positions_keep_one(tmp_path):
    stored = random_stored(6, ROWS, COLS, seed=16)
    positions = axial_positions(6)
    positions[3] = positions[2]
    write_series(tmp_path, stored, positions)
    volume = load_series(tmp_path, workers=1)
    assert volume.shape == (5, ROWS, COLS)
    np.testing.assert_array_equal(volume.hu, hu_of(stored[[0, 1, 2, 4, 5]]))
    assert has_warning(volume, "duplicate", "4.dcm (kept 3.dcm)")


def test_gap_is_reported_and_spacing_is_the_median_step(tmp_path):
    stored = random_stored(8, ROWS, COLS, seed=17)
    z = np.array([0, -1, -2, -3, -6, -7, -8, -9], dtype=float)  # two slices missing after z=3
    positions = np.column_stack([np.zeros(8), np.zeros(8), z])
    write_series(tmp_path, stored, positions)
    volume = load_series(tmp_path, workers=1)
    assert volume.spacing[0] == pytest.approx(1.0)
    assert has_warning(volume, "gap", "3 mm between z=3 (4.dcm) and 5.dcm")
    np.testing.assert_array_equal(volume.hu, hu_of(stored))


def test_gantry_tilt_warns_and_keeps_data(tmp_path):
    stored = random_stored(5, ROWS, COLS, seed=18)
    positions = axial_positions(5)
    positions[:, 1] += np.arange(5) * np.tan(np.radians(15.0))  # y shifts 15° per slice step
    write_series(tmp_path, stored, positions)
    volume = load_series(tmp_path, workers=1)
    assert has_warning(volume, "gantry tilt", "15.00°")
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    np.testing.assert_allclose(volume.affine @ [4, 0, 0, 1], [*positions[4], 1])


def test_mixed_matrix_sizes(tmp_path):
    big = random_stored(19, ROWS, COLS, seed=19)
    small = random_stored(1, 6, 6, seed=20)
    positions = axial_positions(20)
    write_series(tmp_path / "few", big, positions[:19])
    write_series(tmp_path / "few", small, positions[19:], names=["20.dcm"])
    volume = load_series(tmp_path / "few", workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(big))
    assert has_warning(volume, "mixed matrix size", "dropping 1")
    assert has_warning(volume, "20.dcm")

    write_series(tmp_path / "many", big[:10], positions[:10])
    write_series(tmp_path / "many", random_stored(10, 6, 6), positions[10:], names=[f"{i}.dcm" for i in range(11, 21)])
    with pytest.raises(DicomSeriesError, match="10 of 20"):
        load_series(tmp_path / "many", workers=1)


def test_interleaved_series_keeps_the_larger(tmp_path):
    main = random_stored(8, ROWS, COLS, seed=21)
    scout = random_stored(3, ROWS, COLS, seed=22)
    odd, even = [f"{2 * i + 1}.dcm" for i in range(8)], [f"{2 * i + 2}.dcm" for i in range(3)]
    write_series(tmp_path, main, axial_positions(8), names=odd, series_uid="1.2.3.4.1")
    write_series(tmp_path, scout, axial_positions(3, dz=3.0), names=even, series_uid="1.2.3.4.99")
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(main))
    assert has_warning(volume, "mixes series", "kept 1.2.3.4.1", "1.2.3.4.99 (3 files: 2.dcm, 4.dcm, 6.dcm)")


def test_invalid_arguments(tmp_path):
    write_series(tmp_path, random_stored(2, ROWS, COLS), axial_positions(2))
    with pytest.raises(ValueError):
        load_series(tmp_path, workers=0)
    with pytest.raises(ValueError):
        load_series(tmp_path, min_valid_fraction=0.0)

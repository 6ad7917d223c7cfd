"""Bad DICOM series the loader's own tests leave out: each gives a right volume (warned) or a named error.

tests/test_dicom_series.py and tests/test_dicom_real.py already prove most rows of the failure matrix
(docs/failure_matrix.md); these are the gaps: uneven steps without a gap, mixed pixel representations,
names and InstanceNumbers that both disagree with the positions, tied interleaved series, a compressed
slice that no decoder accepts, a decoder worker that dies, memory on huge slice counts, and two former
bugs kept as regression tests (non-finite or zero rescale values, a JPEG Lossless frame cut short).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

import rsna_cspine.io.dicom.series as series_module
from tests.dicom_factory import axial_positions, make_ct_slice, random_stored, save_slice, write_series
from tests.paths import REAL_DATA
from rsna_cspine.errors import DicomSeriesError
from rsna_cspine.io.dicom import load_series

ROWS, COLS = 12, 10
REAL = REAL_DATA / "pydicom"


def hu_of(stored: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def warning_with(volume, *fragments: str) -> str:
    """The first warning containing every fragment (fails the test when there is none)."""
    found = [w for w in volume.warnings if all(f in w for f in fragments)]
    assert found, f"no warning with {fragments} in {volume.warnings}"
    return found[0]


def replace_frame(path: Path, edit) -> None:
    """Rewrite the single compressed frame of ``path`` as ``edit(frame)``, properly re-encapsulated."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([edit(frame)])
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- geometry and order


def test_uneven_steps_without_a_gap_are_warned_and_positions_kept(tmp_path) -> None:
    # Steps vary by more than 10 % of the median but none is a gap (> 1.5 × median).
    steps = np.array([1.0, 1.0, 1.3, 1.0, 0.8, 1.0, 1.0])
    z = -np.concatenate([[0.0], np.cumsum(steps)])
    positions = np.column_stack([np.zeros(8), np.zeros(8), z])
    stored = random_stored(8, ROWS, COLS, seed=30)
    write_series(tmp_path, stored, positions)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.spacing[0] == pytest.approx(np.median(steps))
    warning_with(volume, "non-uniform slice steps from 0.8 to 1.3 mm")
    # The true positions travel with the volume, so a consumer can resample exactly.
    np.testing.assert_allclose(volume.positions, positions)
    assert not any("gap" in w for w in volume.warnings)


def test_small_jitter_is_not_reported(tmp_path) -> None:
    # ±5 % jitter (scanner rounding) is a uniform series: no warning, spacing the median step.
    steps = np.array([1.0, 1.05, 0.95, 1.0, 1.04])
    positions = np.column_stack([np.zeros(6), np.zeros(6), -np.concatenate([[0.0], np.cumsum(steps)])])
    write_series(tmp_path, random_stored(6, ROWS, COLS, seed=31), positions)
    volume = load_series(tmp_path, workers=1)
    assert volume.warnings == [] and volume.spacing[0] == pytest.approx(1.0)


def test_order_follows_positions_when_names_and_instance_numbers_both_disagree(tmp_path) -> None:
    rng = np.random.default_rng(32)
    n = 9
    stored = random_stored(n, ROWS, COLS, seed=32)
    positions = axial_positions(n, dz=0.625, top=40.0)
    write_order = rng.permutation(n)  # slice k is written as file names[k] with InstanceNumber numbers[k]
    names = [f"{v}.dcm" for v in rng.permutation(np.arange(200, 200 + n))]
    numbers = rng.permutation(np.arange(1, n + 1))
    for k, i in enumerate(write_order):
        ds = make_ct_slice(stored[i], position=positions[i], instance_number=int(numbers[k]))
        save_slice(ds, tmp_path / names[k])
    assert not np.array_equal(numbers[np.argsort(write_order)], np.arange(1, n + 1))  # InstanceNumber misleads
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    np.testing.assert_allclose(volume.positions, positions)
    assert volume.files == [names[k] for k in np.argsort(write_order)]


def test_tied_interleaved_series_choice_does_not_depend_on_file_names(tmp_path) -> None:
    a, b = random_stored(4, ROWS, COLS, seed=33), random_stored(4, ROWS, COLS, seed=34)
    chosen = []
    for trial, (names_a, names_b) in enumerate([(["1", "3", "5", "7"], ["2", "4", "6", "8"]),
                                                (["8", "6", "4", "2"], ["7", "5", "3", "1"])]):
        folder = tmp_path / str(trial)
        write_series(folder, a, axial_positions(4), names=[f"{n}.dcm" for n in names_a], series_uid="1.2.3.4.7")
        write_series(folder, b, axial_positions(4, dz=2.0), names=[f"{n}.dcm" for n in names_b], series_uid="1.2.3.4.8")
        volume = load_series(folder, workers=1)
        warning_with(volume, "mixes series", "4 slices")
        chosen.append(volume.hu)
    np.testing.assert_array_equal(chosen[0], chosen[1])
    assert np.array_equal(chosen[0], hu_of(a)) or np.array_equal(chosen[0], hu_of(b))


def test_single_slice_without_thickness_assumes_1_mm_with_warning(tmp_path) -> None:
    stored = random_stored(1, ROWS, COLS, seed=35)
    save_slice(make_ct_slice(stored[0], position=(0.0, 0.0, 5.0)), tmp_path / "1.dcm")
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    assert volume.spacing[0] == 1.0
    warning_with(volume, "single slice", "assuming 1 mm")


def test_a_file_given_as_the_folder_raises_naming_it(tmp_path) -> None:
    path = write_series(tmp_path, random_stored(1, ROWS, COLS), axial_positions(1))[0]
    with pytest.raises(DicomSeriesError, match="not a folder") as info:
        load_series(path, workers=1)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- pixel values


def test_signed_unsigned_and_12_bit_slices_mixed_in_one_series(tmp_path) -> None:
    # One series whose slices disagree on PixelRepresentation, BitsStored and rescale: each slice is
    # read with its own header, so all HU are right.
    rng = np.random.default_rng(36)
    hu = rng.integers(-1000, 2000, (6, ROWS, COLS))
    slices = [
        (hu[0].astype(np.int16), 0.0, None),  # signed 16-bit, HU stored directly
        ((hu[1] + 1024).astype(np.uint16), -1024.0, None),  # unsigned, the usual CT intercept
        (hu[2].astype(np.int16), 0.0, 12),  # signed 12-bit
        ((hu[3] + 1024).astype(np.uint16), -1024.0, 12),  # unsigned 12-bit
        ((hu[4] + 2048).astype(np.uint16), -2048.0, None),
        (hu[5].astype(np.int16), 0.0, None),
    ]
    positions = axial_positions(6)
    for k, (stored, intercept, bits) in enumerate(slices):
        ds = make_ct_slice(stored, position=positions[k], intercept=intercept, bits_stored=bits, instance_number=k + 1)
        save_slice(ds, tmp_path / f"{k + 1}.dcm")
    assert {pydicom.dcmread(p).PixelRepresentation for p in tmp_path.iterdir()} == {0, 1}
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    assert volume.warnings == []


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("RescaleSlope", "NaN"), ("RescaleSlope", "inf"), ("RescaleIntercept", "1e39"), ("RescaleSlope", "0")],
    ids=["nan-slope", "infinite-slope", "overflowing-intercept", "zero-slope"],
)
def test_non_finite_or_zero_rescale_is_refused(tmp_path, keyword: str, value: str) -> None:
    # Once a known bug: NaN / inf HU were returned silently and slope 0 was read as 1.
    stored = random_stored(10, ROWS, COLS, seed=37)
    paths = write_series(tmp_path, stored, axial_positions(10))
    config = pydicom.config.settings
    saved = config.writing_validation_mode
    config.writing_validation_mode = pydicom.config.IGNORE  # store the bad value as given
    try:
        ds = pydicom.dcmread(paths[2])
        setattr(ds, keyword, value)
        ds.save_as(paths[2])
    finally:
        config.writing_validation_mode = saved
    volume = load_series(tmp_path, workers=1)  # 9 of 10 slices is the default min_valid_fraction
    keep = [k for k in range(10) if k != 2]
    assert np.isfinite(volume.hu).all(), "non-finite HU in the volume"
    assert volume.shape == (9, ROWS, COLS), f"the bad slice was kept: {volume.warnings}"
    np.testing.assert_array_equal(volume.hu, hu_of(stored[keep]))
    warning_with(volume, "3.dcm", keyword)  # the file and the field at fault
    warning_with(volume, "gap", "between z=1 (2.dcm) and 4.dcm")  # the hole it leaves is reported
    with pytest.raises(DicomSeriesError, match="3.dcm"):  # and with no slice to spare, the series is refused
        load_series(tmp_path, workers=1, min_valid_fraction=1.0)


# --------------------------------------------------------------------------- compressed data


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "decoder-pool"])
def test_jpeg_slice_every_decoder_rejects_is_dropped_and_named(tmp_path, workers: int) -> None:
    # 10 JPEG Lossless slices (the RSNA syntax, encoded by GDCM); slice 4 loses its start-of-image
    # marker, which GDCM and pylibjpeg both refuse. 10 slices ≥ the pool threshold for workers=2.
    stored = random_stored(10, 32, 32, seed=38)
    paths = write_series(tmp_path, stored, axial_positions(10), transfer_syntax=JPEGLosslessSV1)
    replace_frame(paths[3], lambda frame: b"\x00\x00" + frame[2:])
    volume = load_series(tmp_path, workers=workers, min_valid_fraction=0.9)
    keep = [k for k in range(10) if k != 3]
    np.testing.assert_array_equal(volume.hu, hu_of(stored[keep]))
    assert volume.files == [f"{k + 1}.dcm" for k in keep]
    message = warning_with(volume, "skipped 1 slice file(s): 4.dcm", "cannot decode")
    assert "gdcm" in message and "pylibjpeg" in message  # every decoder was tried
    warning_with(volume, "gap", "between z=2 (3.dcm) and 5.dcm")  # the hole it leaves is reported


def _die_in_worker(path: str) -> None:
    """Stands in for a decoder that kills its worker process (module level: the pool pickles it by name)."""
    os._exit(1)


def test_a_dead_decoder_worker_is_recovered_by_decoding_in_process(tmp_path, monkeypatch) -> None:
    stored = random_stored(9, 32, 32, seed=39)
    write_series(tmp_path, stored, axial_positions(9), transfer_syntax=JPEG2000Lossless)
    monkeypatch.setattr(series_module, "decode_chunk", _die_in_worker)  # the worker entry point only
    volume = load_series(tmp_path, workers=2)
    np.testing.assert_array_equal(volume.hu, hu_of(stored))
    warning_with(volume, "decoder pool failed", "decoding in-process instead")


def test_truncated_jpeg_frame_is_not_decoded_into_a_wrong_slice(tmp_path) -> None:
    # Three copies of a real JPEG Lossless CT slice (Siemens, 512²); the middle one is cut after half
    # of its compressed stream. Once a known bug: GDCM refused it, the pylibjpeg fallback decoded a
    # partial image that was kept as a valid slice with only a 'decoder fallback' note.
    source = REAL / "bad_sequence.dcm"
    if not source.is_file():
        pytest.skip("real test files not available")
    for k in range(3):
        ds = pydicom.dcmread(source)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 1.5 * k]
        ds.save_as(tmp_path / f"{k + 1}.dcm")
    replace_frame(tmp_path / "2.dcm", lambda frame: frame[: len(frame) // 2])
    original = pydicom.dcmread(source)
    slope, intercept = float(original.RescaleSlope), float(original.RescaleIntercept)
    reference = (original.pixel_array * slope + intercept).astype(np.float32)
    volume = load_series(tmp_path, workers=1, min_valid_fraction=0.5)
    for z, name in enumerate(volume.files):
        assert np.array_equal(volume.hu[z], reference), f"{name} is not its true image: {volume.warnings}"
    assert volume.files == ["1.dcm", "3.dcm"]
    warning_with(volume, "skipped 1 slice file(s): 2.dcm", "truncated")
    assert not any("fallback" in w for w in volume.warnings), volume.warnings  # no decoder was tried on it


# --------------------------------------------------------------------------- memory

_MEASURE = textwrap.dedent(
    """
    import sys
    from rsna_cspine.io.dicom import load_series

    def status_kib(key):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key))

    load_series(sys.argv[2], workers=1)  # warm-up: lazy imports and caches are not the loader's memory
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        sys.exit(3)
    before = status_kib("VmRSS:")
    volume = load_series(sys.argv[1], workers=1)
    print(volume.shape[0], volume.hu.nbytes, (status_kib("VmHWM:") - before) * 1024)
    """
)


def write_many_slices(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` uncompressed ``size``² slices 0.5 mm apart, written fast by patching one template's bytes."""
    folder.mkdir(parents=True)
    ds = make_ct_slice(np.zeros((size, size), np.int16), position=(0.0, 0.0, 0.0))
    ds.ImagePositionPatient = ["-10.0", "-20.0", "+00000.000"]  # a fixed-width z to patch
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = buffer.getvalue()[: -size * size * 2]
    z_at = header.index(b"+00000.000")
    rng = np.random.default_rng(seed)
    for i in range(n):
        z = f"{-0.5 * i:+010.3f}".encode()
        pixels = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
        (folder / f"{i + 1}.dcm").write_bytes(header[:z_at] + z + header[z_at + len(z):] + pixels)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize(("n_slices", "size"), [(1500, 64), (160, 512)], ids=["1500x64", "160x512"])
def test_memory_stays_bounded_on_huge_slice_counts(tmp_path, n_slices: int, size: int) -> None:
    # Peak RSS growth of a fresh process during load_series (the peak is reset just before). The
    # float32 output itself is the floor; each slice may add its parsed header (~20 kB), nothing more.
    # A float64 copy of each slice kept until the end would add 2× the output and fail both cases.
    write_many_slices(tmp_path / "big", n_slices, size)
    write_many_slices(tmp_path / "warm", 2, 8)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "big"), str(tmp_path / "warm")],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode == 3:
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    assert result.returncode == 0, result.stderr
    loaded, output_bytes, growth = (int(v) for v in result.stdout.split())
    assert loaded == n_slices and output_bytes == n_slices * size * size * 4
    budget = 1.5 * output_bytes + 32 * 1024 * n_slices
    assert output_bytes <= growth * 1.05 and growth < budget, (growth / output_bytes, growth, budget)

"""The loader's fast paths against pydicom's own decoding.

Uncompressed 16-bit slices are read at their file offset with numpy, and folders of a few dozen
files (8 compressed ones) are read by forked worker processes. Every layout here must give exactly
``pixel_array × slope + intercept`` per file (pydicom's reading, the yardstick), in the order of
ImagePositionPatient, with one worker and with two.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

import rsna_cspine.io.dicom.series as series_module
from rsna_cspine.io.dicom import load_series, read_slice_header
from rsna_cspine.io.dicom.pool import MIN_FILES_FOR_POOL_COMPRESSED, MIN_FILES_FOR_POOL_UNCOMPRESSED
from tests.dicom_factory import axial_positions, make_ct_slice, random_stored, save_slice, write_series

ROWS, COLS = 16, 12
#: Enough uncompressed files for the header pass to run in worker processes.
POOLED_UNCOMPRESSED = MIN_FILES_FOR_POOL_UNCOMPRESSED
#: Enough compressed files for both passes to run in worker processes.
POOLED_COMPRESSED = MIN_FILES_FOR_POOL_COMPRESSED + 1


def pydicom_reference(folder: Path) -> np.ndarray:
    """Each file through ``pydicom.dcmread(...).pixel_array`` and its own rescale, highest z first."""
    slices = []
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu.astype(np.float32)))
    slices.sort(key=lambda item: -item[0])
    return np.stack([hu for _, hu in slices])


def write_layout(folder: Path, n: int, layout: str, seed: int) -> None:
    """``n`` slices in one pixel layout, written in shuffled file order with per-slice rescale values."""
    rng = np.random.default_rng(seed)
    signed = layout not in ("unsigned", "unsigned 12-bit with junk high bits", "8-bit")
    stored = random_stored(n, ROWS, COLS, signed=signed, seed=seed)
    positions = axial_positions(n, dz=0.8)
    order = rng.permutation(n)  # file k holds slice order[k]: names say nothing about the position
    slopes = rng.choice([1.0, 0.5, 2.0], size=n)
    intercepts = rng.choice([-1024.0, 0.0, -1000.5], size=n)
    for k, z in enumerate(order):
        values = stored[z]
        if layout == "8-bit":
            values = (values % 256).astype(np.uint16)
        ds = make_ct_slice(values, position=positions[z], slope=float(slopes[z]), intercept=float(intercepts[z]),
                           bits_stored=12 if "12-bit" in layout else None)
        if "junk" in layout:
            # 12 significant bits and random bits above them, which pydicom masks or sign-extends.
            junk = rng.integers(0, 16, (ROWS, COLS)).astype(np.uint16) << 12
            ds.PixelData = ((values.astype(np.uint16) & 0x0FFF) | junk).tobytes()
        if layout == "MONOCHROME1":
            ds.PhotometricInterpretation = "MONOCHROME1"  # display inversion only: HU stay stored × slope + intercept
        if layout == "8-bit":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = values.astype(np.uint8).tobytes()
        if layout == "Implicit VR":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        save_slice(ds, folder / f"{k + 1}.dcm")


LAYOUTS = [
    "signed",
    "unsigned",
    "signed 12-bit with junk high bits",
    "unsigned 12-bit with junk high bits",
    "MONOCHROME1",
    "Implicit VR",
    "8-bit",  # not the numpy fast path: pydicom's native decoder, whole file
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_uncompressed_layouts_equal_pydicom_with_one_and_two_workers(tmp_path, layout):
    write_layout(tmp_path, POOLED_UNCOMPRESSED, layout, seed=LAYOUTS.index(layout))
    header = read_slice_header(tmp_path / "1.dcm")
    assert header.pixel_offset is not None  # the pixels are read at their offset, not through a re-parse
    written = pydicom.dcmread(tmp_path / "1.dcm", stop_before_pixels=True)
    syntax = ImplicitVRLittleEndian if layout == "Implicit VR" else ExplicitVRLittleEndian
    assert written.file_meta.TransferSyntaxUID == syntax
    assert written.PhotometricInterpretation == ("MONOCHROME1" if layout == "MONOCHROME1" else "MONOCHROME2")
    reference = pydicom_reference(tmp_path)
    for workers in (1, 2):
        volume = load_series(tmp_path, workers=workers)
        assert volume.hu.dtype == np.float32
        np.testing.assert_array_equal(volume.hu, reference, err_msg=f"{layout}, {workers} worker(s)")
        assert np.all(np.diff(volume.positions[:, 2]) < 0)
        assert volume.warnings == []


@pytest.mark.parametrize(
    ("syntax", "signed", "bits_stored"),
    [
        (JPEG2000Lossless, True, 16),
        (JPEGLosslessSV1, True, 16),
        (RLELossless, False, 12),
        (JPEG2000Lossless, False, 12),
    ],
    ids=["j2k-signed", "jpeg-ll-signed", "rle-unsigned-12", "j2k-unsigned-12"],
)
def test_compressed_series_equal_pydicom_in_worker_processes(tmp_path, syntax, signed, bits_stored):
    n = POOLED_COMPRESSED
    stored = random_stored(n, 32, 32, signed=signed, seed=40)  # the J2K encoder needs >= 32²
    if bits_stored == 12:
        stored &= 0x0FFF
    positions = axial_positions(n)[::-1]  # file 1 is the most inferior slice
    rng = np.random.default_rng(41)
    for k in range(n):
        ds = make_ct_slice(stored[k], position=positions[k], slope=float(rng.choice([1.0, 0.5])),
                           intercept=-1024.0, bits_stored=bits_stored, instance_number=k + 1)
        save_slice(ds, tmp_path / f"{k + 1}.dcm", syntax)
    assert pydicom.dcmread(tmp_path / "1.dcm").file_meta.TransferSyntaxUID == syntax
    reference = pydicom_reference(tmp_path)
    pooled = load_series(tmp_path, workers=2)
    np.testing.assert_array_equal(pooled.hu, reference)
    np.testing.assert_array_equal(load_series(tmp_path, workers=1).hu, reference)
    assert pooled.files == [f"{k}.dcm" for k in range(n, 0, -1)]
    assert pooled.warnings == []


_SPY_FILE = "pids.txt"


def _spy_on(function_name: str, log: Path, monkeypatch) -> None:
    """Record the process id of each call of a worker entry point (the real function still runs)."""
    original = getattr(series_module, function_name)

    def recorded(payload):
        with open(log, "a") as out:
            out.write(f"{function_name} {os.getpid()}\n")
        return original(payload)

    monkeypatch.setattr(series_module, function_name, recorded)  # the workers are forked: they see it


def test_both_passes_really_run_in_worker_processes(tmp_path, monkeypatch):
    # Guards the tests above: a pool that silently never started would make them vacuous.
    write_series(tmp_path / "series", random_stored(POOLED_COMPRESSED, 32, 32, seed=42),
                 axial_positions(POOLED_COMPRESSED), transfer_syntax=RLELossless)
    log = tmp_path / _SPY_FILE
    _spy_on("read_header_chunk", log, monkeypatch)
    _spy_on("decode_chunk", log, monkeypatch)
    load_series(tmp_path / "series", workers=2)
    calls = [line.split() for line in log.read_text().splitlines()]
    assert {name for name, _ in calls} == {"read_header_chunk", "decode_chunk"}
    assert str(os.getpid()) not in {pid for _, pid in calls}
    assert len({pid for _, pid in calls}) == 2  # both workers got tasks


def test_messy_folder_gives_the_same_volume_and_warnings_with_workers(tmp_path):
    # Everything the header pass sorts out, in a folder big enough for the worker pool.
    n = POOLED_UNCOMPRESSED + 6
    stored = random_stored(n, ROWS, COLS, seed=43)
    positions = axial_positions(n)
    positions[10] = positions[9]  # a duplicate position
    paths = write_series(tmp_path, stored, positions)
    paths[20].write_bytes(paths[20].read_bytes()[:-100])  # cut into the pixel data
    write_series(tmp_path, random_stored(2, ROWS, COLS, seed=44), axial_positions(2, dz=5.0),
                 names=["scout1.dcm", "scout2.dcm"], series_uid="1.2.3.4.77")
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    serial = load_series(tmp_path, workers=1)
    pooled = load_series(tmp_path, workers=2)
    np.testing.assert_array_equal(pooled.hu, serial.hu)
    assert pooled.files == serial.files
    assert pooled.warnings == serial.warnings
    keep = [k for k in range(n) if k not in (10, 20)]
    np.testing.assert_array_equal(serial.hu, (stored[keep].astype(np.float64) - 1024.0).astype(np.float32))
    for fragment in ("21.dcm (pixel data truncated", "11.dcm (kept 10.dcm)", "1.2.3.4.77", "notes.txt"):
        assert any(fragment in w for w in serial.warnings), (fragment, serial.warnings)


def _die_in_worker(payload) -> None:
    """Stands in for a header parse that kills its worker (module level: the fork keeps it by name)."""
    os._exit(1)


def test_a_dead_header_worker_is_recovered_in_process(tmp_path, monkeypatch):
    stored = random_stored(POOLED_UNCOMPRESSED, ROWS, COLS, seed=45)
    write_series(tmp_path, stored, axial_positions(POOLED_UNCOMPRESSED))
    monkeypatch.setattr(series_module, "read_header_chunk", _die_in_worker)
    volume = load_series(tmp_path, workers=2)
    np.testing.assert_array_equal(volume.hu, (stored.astype(np.float64) - 1024.0).astype(np.float32))
    assert any("header pool failed" in w and "in-process" in w for w in volume.warnings), volume.warnings

"""The loader on real DICOM files (pydicom's test corpus and TotalSegmentator's example CT series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder

from tests.paths import REAL_DATA
from rsna_cspine.io.dicom import (
    DEFAULT_DECODING_PLUGINS,
    load_series,
    read_slice_header,
    read_slice_hu,
)

REAL = REAL_DATA
PYDICOM_DIR = REAL / "pydicom"
SERIES_DIR = REAL / "totalsegmentator" / "example_ct_dicom"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="real test files not available")


def _image_files(modalities: tuple[str, ...]) -> list[Path]:
    if not PYDICOM_DIR.is_dir():
        return []
    out = []
    for path in sorted(PYDICOM_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("Modality") in modalities:
            out.append(path)
    return out


def reference_hu(path: Path) -> np.ndarray:
    """pydicom's own decode (default plugin choice) with the modality rescale."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.mark.parametrize("path", _image_files(("CT", "MR")), ids=lambda p: p.name)
def test_single_file_decode_equals_pydicom(path):
    hu = read_slice_hu(path)
    reference = reference_hu(path)
    assert hu.dtype == np.float32 and hu.shape == reference.shape
    np.testing.assert_array_equal(hu, reference.astype(np.float32))


COMPRESSED = [p for p in _image_files(("CT", "MR", "NM")) if read_slice_header(p).is_compressed]


@pytest.mark.parametrize("path", COMPRESSED, ids=lambda p: p.name)
def test_gdcm_and_pylibjpeg_agree(path):
    np.testing.assert_array_equal(read_slice_hu(path, plugins=("gdcm",)), read_slice_hu(path, plugins=("pylibjpeg",)))


def test_lossy_j2k_equals_its_uncompressed_twin():
    j2k = read_slice_hu(PYDICOM_DIR / "693_J2KI.dcm")
    assert read_slice_header(PYDICOM_DIR / "693_J2KI.dcm").transfer_syntax == pydicom.uid.JPEG2000
    np.testing.assert_array_equal(j2k, read_slice_hu(PYDICOM_DIR / "693_UNCI.dcm"))
    assert j2k.min() < -2000  # values below the padding value: sign handled in 14-bit signed data


def test_jpeg_lossless_16_bit_signed():
    path = PYDICOM_DIR / "JPEG-LL.dcm"
    header = read_slice_header(path)
    assert header.transfer_syntax == pydicom.uid.JPEGLosslessSV1
    ds = pydicom.dcmread(path)
    assert (ds.BitsStored, ds.PixelRepresentation) == (16, 1)
    hu = read_slice_hu(path)
    np.testing.assert_array_equal(hu, reference_hu(path).astype(np.float32))
    assert hu.shape == (1024, 256)


def test_pixel_representation_mismatch_in_j2k_stream():
    # The J2K codestream and the header disagree on signedness; pydicom corrects it, so must we.
    path = PYDICOM_DIR / "J2K_pixelrep_mismatch.dcm"
    hu = read_slice_hu(path)
    np.testing.assert_array_equal(hu, reference_hu(path).astype(np.float32))
    assert hu.min() == -2000.0  # the padding value, negative only if the sign was corrected


def test_bad_sequence_file_loads_as_a_series_with_warnings(tmp_path):
    (tmp_path / "1.dcm").symlink_to(PYDICOM_DIR / "bad_sequence.dcm")
    volume = load_series(tmp_path, workers=1)
    assert volume.shape == (1, 512, 512)
    np.testing.assert_array_equal(volume.hu[0], reference_hu(PYDICOM_DIR / "bad_sequence.dcm").astype(np.float32))
    assert any(w.startswith("pydicom") and "Invalid value" in w for w in volume.warnings)
    assert any("single slice" in w for w in volume.warnings)
    assert volume.spacing[1:] == pytest.approx((0.287109375, 0.287109375))


@pytest.mark.parametrize(("failing", "expected"), [("pylibjpeg", "gdcm"), ("gdcm", "pylibjpeg")])
@pytest.mark.parametrize("name", ["693_J2KR.dcm", "bad_sequence.dcm"])
def test_fallback_decoder_gives_the_same_array(tmp_path, monkeypatch, name, failing, expected):
    path = PYDICOM_DIR / name
    reference = read_slice_hu(path)
    decoder = get_decoder(read_slice_header(path).transfer_syntax)

    def broken(src, runner):
        raise RuntimeError(f"simulated {failing} failure")

    monkeypatch.setitem(decoder._available, failing, broken)  # pydicom's plugin registry
    fallback = read_slice_hu(path, plugins=(failing, expected))
    np.testing.assert_array_equal(fallback, reference)
    (tmp_path / "1.dcm").symlink_to(path)
    volume = load_series(tmp_path, workers=1)
    np.testing.assert_array_equal(volume.hu[0], reference)
    if failing == DEFAULT_DECODING_PLUGINS[0]:  # the default first choice failed
        assert any(f"{expected} after {failing}" in w for w in volume.warnings)


@pytest.fixture(scope="module")
def series_volume():
    return load_series(SERIES_DIR, workers=1)


def test_totalsegmentator_series_order_and_spacing(series_volume):
    volume = series_volume
    assert volume.shape == (20, 512, 512)
    headers = [read_slice_header(p) for p in sorted(SERIES_DIR.iterdir())]
    assert {h.transfer_syntax for h in headers} == {pydicom.uid.JPEG2000Lossless}
    # superior first: patient z strictly decreasing, 2 mm apart, like the headers' positions
    z = volume.positions[:, 2]
    assert np.all(np.diff(z) < 0)
    np.testing.assert_allclose(np.diff(z), -2.0)
    assert sorted(z.tolist(), reverse=True) == sorted((float(h.position[2]) for h in headers), reverse=True)
    assert volume.spacing == pytest.approx((2.0, *headers[0].pixel_spacing))
    assert volume.spacing[1:] == pytest.approx((0.9765625, 0.9765625))
    assert volume.slice_numbers.tolist() == [-1] * 20  # names are UIDs, not numbers
    assert volume.reversed_numbering is False  # InstanceNumber grows towards the feet
    assert volume.warnings == []


def test_totalsegmentator_series_values(series_volume):
    volume = series_volume
    def height(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    by_height = sorted(SERIES_DIR.iterdir(), key=height, reverse=True)  # reference order, built by hand
    for z in (0, 7, 19):
        np.testing.assert_array_equal(volume.hu[z], reference_hu(by_height[z]).astype(np.float32))
    # plausible CT: air at -1024 outside the body, soft tissue around 0-100, some dense bone
    assert volume.hu.min() == pytest.approx(-1024.0)
    assert 1000 < volume.hu.max() < 3100
    centre = volume.hu[:, 200:320, 200:320]
    assert -200 < float(np.median(centre)) < 200
    assert float(np.mean(volume.hu < -900)) > 0.2


def test_totalsegmentator_series_in_worker_processes(series_volume):
    pooled = load_series(SERIES_DIR, workers=2)  # 20 compressed slices: decoded in a process pool
    np.testing.assert_array_equal(pooled.hu, series_volume.hu)
    np.testing.assert_array_equal(pooled.positions, series_volume.positions)

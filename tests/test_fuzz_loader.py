"""Fuzzing the DICOM loader with mutated real files: a valid Volume or a DicomSeriesError, nothing else.

Hypothesis mutates the bytes (header and pixel data) and the header fields of the real files in
``../shared/data/real`` (single files and small series made from them), bounded in examples and
derandomized so that every run tries the same inputs. Each load runs in a forked child process:
some failures are not Python exceptions at all (a native decoder that aborts the process or loops
forever), and one of them must not take pytest down. The child reports what happened; the parent
decides whether it is allowed.

The fuzzers tolerate no other outcome. The bugs they found (a decoder panic, native aborts and hangs,
unvalidated header fields) are fixed; each keeps a minimal reproduction below as a regression test
that asserts the loader's answer: a ``DicomSeriesError`` naming the file and the cause, or a valid
volume whose warnings name the repair. A new finding is fixed, or recorded as a strict-xfail
reproduction with a ``bug=`` row in tests/failure_matrix.py.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate, generate_frames

from tests.paths import REAL_DATA
from rsna_cspine.errors import CSpineError
from rsna_cspine.io.dicom import load_series
from rsna_cspine.io.volume import Volume

REAL = REAL_DATA
PYDICOM_DIR = REAL / "pydicom"
SERIES_DIR = REAL / "totalsegmentator" / "example_ct_dicom"

pytestmark = [
    pytest.mark.skipif(not REAL.is_dir(), reason="real test files not available"),
    # fork keeps the child cheap (no re-import) and is what lets a crash be observed from outside.
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs fork"),
]

#: Seconds one load may take before it counts as a hang. Healthy loads here take well under 1 s.
HANG_TIMEOUT_S = 10.0
#: Examples per fuzz test; with ~0.1 s per forked load each test stays around 20 s on one core.
FUZZ_EXAMPLES = 120
#: Offset of the first data element after the 128-byte preamble and "DICM".
_FIRST_ELEMENT = 132
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


# --------------------------------------------------------------------------- isolated loading


@dataclass(frozen=True)
class Outcome:
    """What one isolated ``load_series`` call did.

    Attributes:
        kind: ``volume`` (valid), ``error`` (the project's error), ``invalid`` (a Volume that breaks its
            contract), ``exception`` (any other exception), ``crash`` (the process died), ``hang``.
        detail: the error, the broken invariants or the exception, one line.
        stderr: the start of what the child wrote to its stderr (abort messages, a hang's traceback).
    """

    kind: str
    detail: str = ""
    stderr: str = ""

    @property
    def allowed(self) -> bool:
        return self.kind in ("volume", "error")


def volume_problems(volume: Volume) -> list[str]:
    """Every way ``volume`` breaks the Volume contract (empty when it is valid).

    Args:
        volume: a loaded volume.
    """
    hu = volume.hu
    if not isinstance(hu, np.ndarray) or hu.ndim != 3 or hu.dtype != np.float32 or min(hu.shape) < 1:
        return [f"hu is not a non-empty float32 (z, y, x) array: {getattr(hu, 'shape', None)}"]
    problems = []
    n = hu.shape[0]
    if not np.isfinite(hu).all():
        problems.append("non-finite HU")
    if volume.positions.shape != (n, 3) or not np.isfinite(volume.positions).all():
        problems.append(f"positions {volume.positions.shape} not ({n}, 3) finite")
    if len(volume.files) != n or len(volume.slice_numbers) != n:
        problems.append("files / slice_numbers do not have one entry per slice")
    if not all(np.isfinite(s) and s > 0 for s in volume.spacing):
        problems.append(f"spacing {volume.spacing} not finite and positive")
    row, col = np.asarray(volume.row_cosine, float), np.asarray(volume.col_cosine, float)
    if not (np.allclose([row @ row, col @ col], 1.0, atol=0.02) and abs(row @ col) < 0.02):
        problems.append(f"row/column cosines not orthonormal: {row.tolist()}, {col.tolist()}")
    if not problems:
        affine = volume.affine
        if not np.isfinite(affine).all():
            problems.append("affine not finite")
        elif abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            problems.append("affine singular")
        elif n > 1 and not np.all(np.diff(volume.positions @ volume.slice_direction) > 0):
            problems.append("slices not ordered along the slice direction")
    return problems


def _load_in_child(send: multiprocessing.connection.Connection, folder: str, stderr_fd: int, timeout_s: float,
                   address_space: int | None) -> None:
    os.dup2(stderr_fd, 2)  # native abort messages and Rust panics go to fd 2
    # Fires from a C watchdog thread even while a decoder holds the GIL: dump where it hangs, then exit.
    dump_to = os.fdopen(os.dup(2), "w")  # kept referenced: faulthandler writes to its descriptor later
    faulthandler.enable(file=dump_to)  # a fatal signal's traceback is captured too, not printed by pytest
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=dump_to)
    if address_space is not None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    try:
        volume = load_series(folder, workers=1)
        problems = volume_problems(volume)
        result = ("invalid", "; ".join(problems)) if problems else ("volume", f"shape {volume.shape}")
    except CSpineError as exc:
        result = ("error", str(exc))
    except BaseException as exc:  # a Rust panic (pyo3) is a BaseException, not an Exception
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = ("exception", f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")
    send.send(result)
    send.close()


def load_isolated(folder: str | Path, timeout_s: float = HANG_TIMEOUT_S, address_space: int | None = None) -> Outcome:
    """Run ``load_series(folder, workers=1)`` in a forked child and classify what happened.

    Hand-written on multiprocessing because the standard pools treat a dead worker as a broken pool
    and cannot time out one call; this needs both, per call.

    Args:
        folder: the series folder.
        timeout_s: seconds after which the load counts as a hang.
        address_space: RLIMIT_AS for the child in bytes (None: unchanged).
    """
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryFile() as stderr:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_load_in_child, args=(send, str(folder), stderr.fileno(), timeout_s, address_space), daemon=True
        )
        child.start()
        send.close()
        result = None
        if receive.poll(timeout_s + 5.0):
            try:
                result = receive.recv()
            except EOFError:  # the child died before answering
                pass
        child.join(timeout=5.0)
        if child.is_alive():
            child.kill()
            child.join()
        receive.close()
        stderr.seek(0)
        # The head: abort messages, panic messages and a hang's innermost frames come first.
        text = stderr.read(8000).decode("utf-8", errors="replace")
    if result is not None:
        return Outcome(result[0], result[1].splitlines()[0][:500] if result[1] else "", text)
    if "Timeout (" in text or child.exitcode is None:
        return Outcome("hang", f"no answer within {timeout_s:g} s", text)
    return Outcome("crash", f"child exit code {child.exitcode}", text)


# --------------------------------------------------------------------------- outcomes


def _record(outcome: Outcome) -> None:
    """Count outcomes for ``pytest --hypothesis-show-statistics``."""
    event(f"outcome {outcome.kind}")


def _explain(outcome: Outcome, description: str) -> str:
    return f"{description}\n-> {outcome.kind}: {outcome.detail}\nchild stderr:\n{outcome.stderr[:1500]}"


# --------------------------------------------------------------------------- real inputs


def _with_position(data: bytes, shift_mm: float, number: int) -> bytes:
    """A copy of a real file moved ``shift_mm`` along z (a real header otherwise), as bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if "ImagePositionPatient" not in ds:
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z - shift_mm]
    ds.InstanceNumber = number
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@cache
def bases() -> dict[str, tuple[bytes, ...]]:
    """Name → the files of one real input (one file, or a small series)."""
    singles = {
        name: ((PYDICOM_DIR / f"{name}.dcm").read_bytes(),)
        for name in ("CT_small", "693_J2KI", "bad_sequence", "JPEG-LL", "MR_small_RLE",
                     "MR_small_jpeg_ls_lossless", "MR_small_jp2klossless")
    }
    ct = singles["CT_small"][0]
    j2k = singles["MR_small_jp2klossless"][0]
    series = {
        "CT_small x4": tuple(_with_position(ct, 1.5 * k, k + 1) for k in range(4)),
        "MR_small_jp2klossless x3": tuple(_with_position(j2k, 2.0 * k, k + 1) for k in range(3)),
        "totalsegmentator first 3": tuple(p.read_bytes() for p in sorted(SERIES_DIR.iterdir())[:3]),
    }
    return {**singles, **series}


def _write_folder(folder: Path, files: tuple[bytes, ...]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(files):
        (folder / f"{k + 1}.dcm").write_bytes(data)
    return folder


def _pixel_data_offset(data: bytes) -> int:
    found = data.rfind(_PIXEL_DATA_TAG)
    return found if found >= _FIRST_ELEMENT else len(data)


# --------------------------------------------------------------------------- byte mutations

_OPERATIONS = ("flip", "overwrite", "truncate", "insert", "delete")
_REGIONS = ("header", "pixels", "anywhere")


def apply_byte_mutations(data: bytes, mutations: list[tuple[str, str, float, int, bytes]]) -> bytes:
    """Apply ``(operation, region, where, amount, payload)`` mutations in order.

    ``where`` in [0, 1) places the mutation inside the region (header: the data elements before
    Pixel Data; pixels: Pixel Data to the end); ``amount`` is the bit to flip or the bytes to delete.

    Args:
        data: the file's bytes.
        mutations: as drawn by :func:`byte_mutations`.
    """
    out = bytearray(data)
    for operation, region, where, amount, payload in mutations:
        pixels = _pixel_data_offset(bytes(out))
        bounds = {"header": (_FIRST_ELEMENT, pixels), "pixels": (pixels, len(out)), "anywhere": (0, len(out))}
        start, stop = bounds[region]
        if stop <= start:
            continue
        at = start + int(where * (stop - start))
        if operation == "flip":
            out[at] ^= 1 << (amount % 8)
        elif operation == "overwrite":
            out[at : at + len(payload)] = payload
        elif operation == "truncate":
            del out[at:]
        elif operation == "insert":
            out[at:at] = payload
        else:
            del out[at : at + amount]
    return bytes(out)


@st.composite
def byte_mutations(draw: st.DrawFn) -> tuple[str, int, bool, list[tuple[str, str, float, int, bytes]]]:
    """(base name, file index, mutate every file, mutations)."""
    name = draw(st.sampled_from(sorted(bases())))
    index = draw(st.integers(0, len(bases()[name]) - 1))
    every_file = draw(st.booleans()) if len(bases()[name]) > 1 else False
    mutation = st.tuples(
        st.sampled_from(_OPERATIONS),
        st.sampled_from(_REGIONS),
        st.floats(0.0, 1.0, exclude_max=True),
        st.integers(1, 16),
        st.binary(min_size=1, max_size=8),
    )
    return name, index, every_file, draw(st.lists(mutation, min_size=1, max_size=3))


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=byte_mutations())
def test_byte_mutations_give_a_valid_volume_or_the_project_error(case) -> None:
    name, index, every_file, mutations = case
    files = tuple(
        apply_byte_mutations(data, mutations) if every_file or k == index else data
        for k, data in enumerate(bases()[name])
    )
    with tempfile.TemporaryDirectory() as folder:
        outcome = load_isolated(_write_folder(Path(folder), files))
    _record(outcome)
    assert outcome.allowed, _explain(outcome, f"{name} file {index} (every file: {every_file}): {mutations}")


# --------------------------------------------------------------------------- header field mutations

_US = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 64, 65535]), st.integers(0, 65535))
_DS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e39", "-1e39", "1e300", "0", "-0", "1e-39", "", "abc"]),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda x: f"{x:.6g}"),
)
_ORIENTATIONS = st.sampled_from([
    [1, 0, 0, 0, 1, 0], [-1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [1, 0, 0, 1, 0, 0],
    [1, 0, 0, 0.7071068, 0.7071068, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1], [2, 0, 0, 0, 2, 0],
])
#: Header field → values to try (None deletes the field).
FIELD_VALUES: dict[str, st.SearchStrategy] = {
    "Rows": _US,
    "Columns": _US,
    "BitsAllocated": _US,
    "BitsStored": _US,
    "HighBit": _US,
    "PixelRepresentation": _US,
    "SamplesPerPixel": _US,
    "PlanarConfiguration": _US,
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", ""]
    ),
    "NumberOfFrames": st.integers(-(2**31), 2**31 - 1),
    "InstanceNumber": st.integers(-(2**31), 2**31 - 1),
    "RescaleSlope": _DS,
    "RescaleIntercept": _DS,
    "SliceThickness": _DS,
    "SpacingBetweenSlices": _DS,
    "ImagePositionPatient": st.lists(_DS, min_size=0, max_size=4),
    "ImageOrientationPatient": st.one_of(_ORIENTATIONS, st.lists(_DS, min_size=0, max_size=7)),
    "PixelSpacing": st.lists(_DS, min_size=0, max_size=3),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3", "1.2.3.4.5.6"]),
    "TransferSyntaxUID": st.sampled_from([
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.999", "1.2.3",
    ]),
}


def apply_header_edits(data: bytes, edits: list[tuple[str, object]]) -> bytes | None:
    """Set (or delete, for None) header fields; None when pydicom cannot write the result.

    Args:
        data: the file's bytes.
        edits: ``(keyword, value)`` pairs from :data:`FIELD_VALUES`.
    """
    config = pydicom.config.settings
    saved = config.reading_validation_mode, config.writing_validation_mode
    # Invalid values are the point: pydicom must store them as given, not refuse or fix them.
    config.reading_validation_mode = config.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in edits:
            target = ds.file_meta if keyword == "TransferSyntaxUID" else ds
            if value is None:
                if keyword in target:
                    delattr(target, keyword)
            else:
                setattr(target, keyword, value)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - a value pydicom cannot encode is simply not a test case
        return None
    finally:
        config.reading_validation_mode, config.writing_validation_mode = saved


@st.composite
def header_edits(draw: st.DrawFn) -> tuple[str, int, bool, list[tuple[str, object]]]:
    """(base name, file index, edit every file, edits)."""
    name = draw(st.sampled_from(sorted(bases())))
    index = draw(st.integers(0, len(bases()[name]) - 1))
    every_file = draw(st.booleans()) if len(bases()[name]) > 1 else False
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        keyword = draw(st.sampled_from(sorted(FIELD_VALUES)))
        edits.append((keyword, draw(st.one_of(st.none(), FIELD_VALUES[keyword]))))
    return name, index, every_file, edits


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=header_edits())
def test_header_field_mutations_give_a_valid_volume_or_the_project_error(case) -> None:
    name, index, every_file, edits = case
    files = []
    for k, data in enumerate(bases()[name]):
        edited = apply_header_edits(data, edits) if every_file or k == index else data
        assume(edited is not None)
        files.append(edited)
    with tempfile.TemporaryDirectory() as folder:
        outcome = load_isolated(_write_folder(Path(folder), tuple(files)))
    _record(outcome)
    assert outcome.allowed, _explain(outcome, f"{name} file {index} (every file: {every_file}): {edits}")


# --------------------------------------------------------------------------- the harness itself


def test_isolation_tells_crash_hang_exception_and_error_apart(tmp_path, monkeypatch) -> None:
    # The classifier is what the fuzz tests trust; each kind is provoked on purpose.
    _write_folder(tmp_path / "good", bases()["CT_small x4"])
    good = load_isolated(tmp_path / "good")
    assert good.kind == "volume" and good.detail == "shape (4, 128, 128)"
    assert load_isolated(tmp_path / "absent").kind == "error"

    import rsna_cspine.io.dicom.series as series_module

    def abort(*args, **kwargs):
        os.abort()

    def spin(*args, **kwargs):
        while True:
            pass

    def type_error(*args, **kwargs):
        raise TypeError("not the project's error")

    outcomes = {}
    for patched in (abort, spin, type_error):
        monkeypatch.setattr(series_module, "build_volume", patched)  # the child is forked: it sees the patch
        outcomes[patched.__name__] = load_isolated(tmp_path / "good", timeout_s=2.0)
    assert outcomes["abort"].kind == "crash"
    assert outcomes["spin"].kind == "hang" and "in spin" in outcomes["spin"].stderr, outcomes["spin"]  # where it hung
    assert outcomes["type_error"].kind == "exception"
    assert outcomes["type_error"].detail.startswith("TypeError: not the project's error")
    assert [o.allowed for o in outcomes.values()] == [False, False, False]


def test_volume_problems_flags_each_broken_invariant() -> None:
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    good = Volume(np.zeros((2, 3, 4), np.float32), (1.0, 0.5, 0.5), positions, np.array([1.0, 0, 0]),
                  np.array([0, 1.0, 0]), np.array([1, 2]), ["1.dcm", "2.dcm"])
    assert volume_problems(good) == []
    nan = Volume(**{**good.__dict__, "hu": np.full((2, 3, 4), np.nan, np.float32)})
    assert volume_problems(nan) == ["non-finite HU"]
    parallel = Volume(**{**good.__dict__, "col_cosine": np.array([1.0, 0, 0])})
    assert "not orthonormal" in volume_problems(parallel)[0]
    shuffled = Volume(**{**good.__dict__, "positions": positions[::-1].copy()})
    assert volume_problems(shuffled) == []  # two slices always step along their own direction
    three = np.array([[0.0, 0, 0], [0, 0, -2.0], [0, 0, -1.0]])
    misordered = Volume(**{**good.__dict__, "hu": np.zeros((3, 3, 4), np.float32), "positions": three,
                           "slice_numbers": np.array([1, 2, 3]), "files": ["1", "2", "3"]})
    assert volume_problems(misordered) == ["slices not ordered along the slice direction"]
    infinite = Volume(**{**good.__dict__, "spacing": (np.inf, 0.5, 0.5)})
    assert volume_problems(infinite)[0].startswith("spacing")


# --------------------------------------------------------------------------- minimal reproductions


def _reencapsulated(data: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """The file with its single compressed frame replaced by ``edit(frame)``, properly re-encapsulated."""
    ds = pydicom.dcmread(io.BytesIO(data))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([edit(frame)])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def assert_refused(folder: Path, file: str, cause: str, **kwargs) -> None:
    """Assert that loading ``folder`` (isolated) ends in a ``DicomSeriesError`` naming ``file`` and ``cause``.

    Args:
        folder: the reproduction.
        file: the file name the message must contain.
        cause: a fragment of the cause the message must contain.
        kwargs: passed to :func:`load_isolated`.
    """
    outcome = load_isolated(folder, **kwargs)
    assert outcome.kind == "error", _explain(outcome, f"expected a DicomSeriesError naming {file}")
    assert file in outcome.detail and cause in outcome.detail, outcome.detail


def test_regression_rle_segment_overrun(tmp_path) -> None:
    # Five bytes of the second RLE segment of a real file, found by the byte fuzzer. pylibjpeg-rle
    # panics on it (pyo3's PanicException, a BaseException), which once escaped load_series; now the
    # panic is one decoder's failure and pydicom's own RLE decoder reads the slice.
    data = bytearray(bases()["MR_small_RLE"][0])
    data[6994:6999] = bytes([123, 97, 132, 70, 95])
    _write_folder(tmp_path, (bytes(data),))
    outcome = load_isolated(tmp_path)
    assert outcome.kind == "volume", _explain(outcome, "expected a volume decoded by the fallback decoder")
    volume = load_series(tmp_path, workers=1)  # safe in-process now that the isolated load succeeded
    assert volume.shape == (1, 64, 64) and np.isfinite(volume.hu).all()
    assert any("1.dcm" in w and "PanicException" in w for w in volume.warnings), volume.warnings


def test_regression_unknown_transfer_syntax(tmp_path) -> None:
    # Once a ValueError ("UID is not a transfer syntax") from SliceHeader.is_compressed.
    data = bases()["CT_small x4"]
    explicit_le = b"1.2.840.10008.1.2.1\x00"
    assert explicit_le in data[0][:_FIRST_ELEMENT + 300]
    _write_folder(tmp_path, tuple(d.replace(explicit_le, b"1.2.840.10008.1.2.9\x00", 1) for d in data))
    assert_refused(tmp_path, "1.dcm", "unknown transfer syntax '1.2.840.10008.1.2.9'")


def test_regression_gdcm_abort_on_32_bit_jpeg_lossless(tmp_path) -> None:
    # Once a process abort: GDCM threw a C++ exception through its C API.
    edited = apply_header_edits(bases()["bad_sequence"][0], [("BitsAllocated", 32)])
    _write_folder(tmp_path, (edited,))
    assert_refused(tmp_path, "1.dcm", "BitsAllocated 32")


def test_regression_gdcm_abort_on_corrupt_jpeg2000_header(tmp_path) -> None:
    # Four bytes missing from the SIZ marker segment: pylibjpeg and Pillow refuse it, GDCM aborted the
    # process. The frame's own size must now agree with the header before any decoder sees it.
    edited = _reencapsulated(bases()["MR_small_jp2klossless"][0], lambda frame: frame[:12] + frame[16:])
    _write_folder(tmp_path, (edited,))
    assert_refused(tmp_path, "1.dcm", "the header says 64x64")


def test_regression_jpeg_lossless_zero_lines(tmp_path) -> None:
    # A JPEG frame header may give 0 lines (then a DNL marker must follow); GDCM refuses the stream,
    # and the pylibjpeg fallback once never returned. This is the RSNA transfer syntax (1.2.840.10008.1.2.4.70).
    def zero_lines(frame: bytes) -> bytes:
        sof3 = frame.index(b"\xff\xc3")
        return frame[: sof3 + 5] + b"\x00\x00" + frame[sof3 + 7 :]

    _write_folder(tmp_path, (_reencapsulated(bases()["bad_sequence"][0], zero_lines),))
    assert_refused(tmp_path, "1.dcm", "compressed frame is 0x512", timeout_s=5.0)


def test_regression_huge_matrix(tmp_path) -> None:
    # Once a MemoryError: the whole volume was allocated before any slice was checked.
    files = tuple(apply_header_edits(d, [("Rows", 65535), ("Columns", 65535)]) for d in bases()["CT_small x4"])
    _write_folder(tmp_path, files)
    # A bounded address space makes the outcome independent of the machine's RAM and overcommit policy.
    with open("/proc/self/status") as status:
        used_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    assert_refused(tmp_path, "1.dcm", "65535x65535", address_space=used_kib * 1024 + 4 * 2**30)


def test_regression_position_overflow(tmp_path) -> None:
    # Once accepted: the slice step overflowed to inf (infinite spacing or a singular affine).
    files = list(bases()["CT_small x4"])
    files[0] = apply_header_edits(files[0], [("ImagePositionPatient", ["1e300", "1e300", "1e300"])])
    _write_folder(tmp_path, tuple(files))
    assert_refused(tmp_path, "1.dcm", "ImagePositionPatient")  # 3 of 4 slices is under min_valid_fraction


def test_regression_parallel_orientation_cosines(tmp_path) -> None:
    # Once accepted: a NaN slice normal left the slices in file order, with a singular affine.
    files = [apply_header_edits(d, [("ImageOrientationPatient", [1, 0, 0, 1, 0, 0])]) for d in bases()["CT_small x4"]]
    _write_folder(tmp_path, tuple(files[k] for k in (2, 0, 3, 1)))  # file order is not slice order
    assert_refused(tmp_path, "1.dcm", "ImageOrientationPatient")

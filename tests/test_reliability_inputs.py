"""Bad NIfTI masks, CSV tables and prediction/training runs the other suites leave out; the failure matrix.

Rows already proven elsewhere (tests/test_nifti.py, tests/test_kaggle_io.py, tests/test_aggregate.py,
tests/test_metric.py, tests/test_pipeline.py, the training tests) are only referenced from
tests/failure_matrix.py; the last section checks that docs/failure_matrix.md is generated from it and
that every test it names exists, with the right xfail status.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.encaps import encapsulate, generate_frames

from tests.dicom_factory import axial_positions, write_series
from tests.failure_matrix import CASES, DOC_PATH, ROOT, defined_tests, referenced_files, render
from tests.paths import REAL_DATA
from rsna_cspine.constants import PROB_EPS, TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.engine import load_checkpoint, save_checkpoint, seed_everything
from rsna_cspine.errors import CSpineError, NiftiError
from rsna_cspine.io.kaggle import read_test_csv
from rsna_cspine.io.nifti import RAS_TO_LPS, SegmentationWarning, load_segmentation
from rsna_cspine.io.volume import Volume
from rsna_cspine.inference import FracturePipeline, PipelineConfig, predict_dataset, timing_log_path
from tests.toy_pipeline import EXPECTED_PRIOR, GOOD, make_tiny_dataset

torch.set_num_threads(1)
REAL_RLE = REAL_DATA / "pydicom" / "MR_small_RLE.dcm"

# --------------------------------------------------------------------------- NIfTI

SHAPE = (12, 20, 16)


def make_volume(origin: tuple[float, float, float] = (-30.0, -40.0, 100.0)) -> Volume:
    """An axial (12, 20, 16) volume, superior first, 1.5 × 0.8 × 0.7 mm, as load_series returns one."""
    spacing = (1.5, 0.8, 0.7)
    positions = np.array([[origin[0], origin[1], origin[2] - spacing[0] * z] for z in range(SHAPE[0])])
    return Volume(np.zeros(SHAPE, np.float32), spacing, positions, np.array([1.0, 0.0, 0.0]),
                  np.array([0.0, 1.0, 0.0]), np.arange(1, SHAPE[0] + 1))


def random_labels(dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, SHAPE).astype(dtype)


def volume_grid_nifti(volume: Volume, labels_zyx: np.ndarray, path: Path) -> Path:
    """Labels stored (x, y, z) with the RAS affine of the volume's own grid."""
    affine_lps = volume.affine[:, [2, 1, 0, 3]]  # storage index (x, y, z) → LPS
    nib.save(nib.Nifti1Image(labels_zyx.transpose(2, 1, 0).copy(), RAS_TO_LPS @ affine_lps), path)
    return path


def nifti_with_sform(path: Path, labels_xyz: np.ndarray, sform: np.ndarray) -> Path:
    """A NIfTI whose only geometry is ``sform`` (nibabel refuses singular affines in its constructor)."""
    header = nib.Nifti1Header()
    header.set_data_shape(labels_xyz.shape)
    header.set_data_dtype(np.uint8)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[0], sform[1], sform[2]
    nib.save(nib.Nifti1Image(labels_xyz, None, header), path)
    return path


@pytest.mark.parametrize("mistake", ["lps-stored-as-ras", "singular", "non-finite"])
def test_wrong_affine_is_refused_naming_the_file(tmp_path, mistake: str) -> None:
    volume = make_volume()
    labels_xyz = random_labels(seed=40).transpose(2, 1, 0).copy()
    lps = volume.affine[:, [2, 1, 0, 3]]  # storage (x, y, z) → LPS: the right geometry, before RAS conversion
    sform = {"lps-stored-as-ras": lps, "singular": np.zeros((4, 4)), "non-finite": np.full((4, 4), np.nan)}[mistake]
    path = nifti_with_sform(tmp_path / f"{mistake}.nii.gz", labels_xyz, sform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy on the NaN matrix
        with pytest.raises(NiftiError) as info:
            load_segmentation(path, volume)
    assert str(path) in str(info.value)
    # The same labels with the right RAS affine load exactly: the refusal is about the affine only.
    right = nifti_with_sform(tmp_path / "right.nii.gz", labels_xyz, RAS_TO_LPS @ lps)
    np.testing.assert_array_equal(load_segmentation(right, volume), random_labels(seed=40))


def test_grid_shifted_beyond_the_overlap_threshold_is_refused(tmp_path) -> None:
    # Two of twelve slices outside (83 % overlap < 90 %): refused. One slice (92 %) is warned instead,
    # see tests/test_nifti.py::test_one_slice_shift_is_filled_with_background_and_warned.
    volume = make_volume()
    shifted = make_volume(origin=(-30.0, -40.0, 100.0 - 2 * volume.spacing[0]))
    path = volume_grid_nifti(shifted, random_labels(seed=41), tmp_path / "shift2.nii.gz")
    with pytest.raises(NiftiError, match="only 83% of the volume lies inside") as info:
        load_segmentation(path, volume)
    assert "shift2.nii.gz" in str(info.value)


def test_negative_and_nan_labels_are_zeroed_with_warning(tmp_path) -> None:
    volume = make_volume()
    signed = random_labels(np.int16, seed=42)
    signed[0, 0, 0], signed[5, 6, 7] = -1, -300
    path = volume_grid_nifti(volume, signed, tmp_path / "signed.nii.gz")
    with pytest.warns(SegmentationWarning, match="outside 0..19 set to 0: -300, -1"):
        loaded = load_segmentation(path, volume)
    expected = signed.copy()
    expected[expected < 0] = 0
    np.testing.assert_array_equal(loaded, expected.astype(np.uint8))

    floats = random_labels(np.float32, seed=43)
    floats[2, 3, 4] = np.nan
    path = volume_grid_nifti(volume, floats, tmp_path / "nan.nii.gz")
    with pytest.warns(SegmentationWarning, match="set to 0: nan"):
        loaded = load_segmentation(path, volume)
    assert loaded[2, 3, 4] == 0 and loaded.dtype == np.uint8
    mask = np.ones(SHAPE, bool)
    mask[2, 3, 4] = False
    np.testing.assert_array_equal(loaded[mask], floats[mask].astype(np.uint8))


# --------------------------------------------------------------------------- CSV tables

CLEAN_TEST_CSV = (
    "row_id,StudyInstanceUID,prediction_type\n"
    "1.2.826.0.1.3680043.10197_C1,1.2.826.0.1.3680043.10197,C1\n"
    "1.2.826.0.1.3680043.10454_patient_overall,1.2.826.0.1.3680043.10454,patient_overall\n"
)


def test_spreadsheet_saved_test_csv_reads_like_the_clean_file(tmp_path) -> None:
    clean = tmp_path / "clean.csv"
    clean.write_text(CLEAN_TEST_CSV)
    # What a spreadsheet saves: a UTF-8 byte-order mark, CRLF line ends, data cells padded with spaces.
    header, *rows = CLEAN_TEST_CSV.splitlines()
    padded = [",".join(f" {cell} " for cell in row.split(",")) for row in rows]
    messy = tmp_path / "messy.csv"
    messy.write_bytes("\ufeff".encode() + "\r\n".join([header, *padded, ""]).encode())
    pd.testing.assert_frame_equal(read_test_csv(messy), read_test_csv(clean))
    assert read_test_csv(messy)["row_id"].tolist() == [row.split(",")[0] for row in rows]


def test_empty_test_csv_writes_no_submission(tmp_path) -> None:
    (tmp_path / "test.csv").write_text("row_id,StudyInstanceUID,prediction_type\n")
    out = tmp_path / "out" / "submission.csv"
    with pytest.raises(CSpineError):
        predict_dataset(tmp_path, tmp_path / "no-models", out, cfg=PipelineConfig(device="cpu"), progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------- prediction and training runs

CPU = PipelineConfig(device="cpu")
PANIC_UID = "1.2.826.0.1.3680043.8.95"


def write_panicking_rle_study(folder: Path) -> None:
    """Three real RLE MR slices 2 mm apart; the middle one has the segment overrun that panics pylibjpeg-rle.

    The five bytes are the byte fuzzer's finding (tests/test_fuzz_loader.py::test_regression_rle_segment_overrun),
    there at file offset 6994, here at the same place in the frame.
    """
    original = REAL_RLE.read_bytes()
    frame = next(generate_frames(pydicom.dcmread(REAL_RLE).PixelData, number_of_frames=1))
    at = 6994 - original.index(frame)
    folder.mkdir(parents=True)
    for k in range(3):
        ds = pydicom.dcmread(REAL_RLE)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 2.0 * k]
        if k == 1:
            ds.PixelData = encapsulate([frame[:at] + bytes([123, 97, 132, 70, 95]) + frame[at + 5 :]])
        ds.save_as(folder / f"{k + 1}.dcm")


def per_study(submission: pd.DataFrame) -> dict[str, np.ndarray]:
    parts = submission["row_id"].str.extract(r"^(?P<uid>.+)_(?P<target>C[1-7]|patient_overall)$")
    table = submission.assign(**parts).pivot(index="uid", columns="target", values="fractured")
    return {uid: table.loc[uid, list(TARGET_COLUMNS)].to_numpy(np.float64) for uid in table.index}


class RunDied(AssertionError):
    """predict_dataset raised instead of writing a submission."""


@pytest.mark.skipif(not REAL_RLE.is_file(), reason="real test files not available")
def test_prediction_run_survives_a_study_whose_decoder_panics(tiny_models: Path, tmp_path: Path, caplog) -> None:
    # Once a known bug: the PanicException escaped predict_dataset and no submission was written.
    data = make_tiny_dataset(tmp_path / "data", uids=GOOD[:2], broken=False)
    clean_test = pd.read_csv(data / "test.csv", dtype=str)
    clean = tmp_path / "clean.csv"
    predict_dataset(data, tiny_models, clean, cfg=CPU, progress=False)

    write_panicking_rle_study(data / "test_images" / PANIC_UID)
    panic_rows = pd.DataFrame([(f"{PANIC_UID}_{t}", PANIC_UID, t) for t in TARGET_COLUMNS], columns=clean_test.columns)
    test = pd.concat([clean_test.iloc[:8], panic_rows, clean_test.iloc[8:]], ignore_index=True)
    test.to_csv(data / "test.csv", index=False)
    out = tmp_path / "submission.csv"
    try:
        with caplog.at_level(logging.WARNING, logger="rsna_cspine.runner"):
            predict_dataset(data, tiny_models, out, cfg=CPU, progress=False)
    except BaseException as exc:  # the point: a Rust panic is not an Exception
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RunDied(f"the prediction run died: {type(exc).__name__}: {exc}") from None
    submission = pd.read_csv(out, dtype={"row_id": str})
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    values = submission["fractured"].to_numpy()
    assert np.isfinite(values).all() and ((values >= PROB_EPS) & (values <= 1 - PROB_EPS)).all()
    with_panic, without = per_study(submission), per_study(pd.read_csv(clean, dtype={"row_id": str}))
    for uid in GOOD[:2]:
        np.testing.assert_array_equal(with_panic[uid], without[uid])
    # Either the study fails (the prior) or the bad slice is dropped / decoded by another plugin;
    # both must leave a trace that names the panic.
    timings = pd.read_csv(timing_log_path(out), dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    status, reason = timings.loc[PANIC_UID, "status"], str(timings.loc[PANIC_UID, "reason"])
    assert "PanicException" in reason, reason
    if status == "failed":
        np.testing.assert_allclose(with_panic[PANIC_UID], EXPECTED_PRIOR, rtol=1e-12)
    assert any(PANIC_UID in r.getMessage() for r in caplog.records)


def test_degenerate_studies_are_predicted_with_the_prior_for_absent_vertebrae(tiny_models: Path, tmp_path: Path) -> None:
    prior = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.19, 0.48])
    pipeline = FracturePipeline.from_models_dir(tiny_models, CPU, prior)
    for shape in [(1, 1, 1), (2, 2, 2), (3, 1, 64)]:
        folder = tmp_path / "x".join(map(str, shape))
        write_series(folder, np.zeros(shape, np.int16), axial_positions(shape[0]))
        prediction = pipeline.predict_study(folder)
        probs, raw = prediction.probs, prediction.vertebra_probs
        assert probs.shape == (8,) and np.all((probs >= PROB_EPS) & (probs <= 1 - PROB_EPS)), shape
        absent = ~np.isfinite(raw)
        np.testing.assert_allclose(probs[:7][absent], prior[:7][absent], rtol=1e-12)
        filled = np.clip(np.where(absent, prior[:7], raw), PROB_EPS, 1 - PROB_EPS)
        assert probs[7] == pytest.approx(1 - np.prod(1 - filled), rel=1e-9)  # noisy-OR, the default rule
        if absent.any():
            assert any("vertebrae not found" in note and VERTEBRAE[int(np.argmax(absent))] in note
                       for note in prediction.warnings), prediction.warnings
        assert prediction.n_slices == shape[0]


def test_checkpoint_write_killed_midway_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    seed_everything(0)
    model = torch.nn.Linear(4, 3)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, epoch=1)
    epoch_1 = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    real_save = torch.save

    def killed_while_writing(obj, target, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        torn = buffer.getvalue()[:200]  # the first bytes reach the disk, then the kill
        target.write(torn) if hasattr(target, "write") else Path(target).write_bytes(torn)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, epoch=2)
    state = load_checkpoint(path)
    assert state["epoch"] == 1
    for name, tensor in epoch_1.items():
        assert torch.equal(state["model"][name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the torn temporary file is gone
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(path, model=model, epoch=2)
    assert load_checkpoint(path)["epoch"] == 2


# --------------------------------------------------------------------------- the published matrix


def test_failure_matrix_document_is_generated_from_the_cases() -> None:
    assert DOC_PATH.is_file(), "run: python -m tests.failure_matrix --write"
    assert DOC_PATH.read_text() == render(), "stale: run python -m tests.failure_matrix --write"


def test_every_test_the_matrix_names_exists() -> None:
    # Read from the sources (AST), so that this holds whatever subset of the suite pytest was asked to run.
    defined = {path: defined_tests(path) for path in referenced_files() if (ROOT / path).is_file()}
    named = [test for case in CASES for test in case.tests]
    assert [t for t in named if "[" in t] == [], "name test functions, not parametrizations"
    missing = [t for t in named if t.split("::", 1)[1] not in defined.get(t.split("::", 1)[0], {})]
    assert not missing, f"the failure matrix names tests that do not exist: {missing}"


#: Tests of the matrix itself; every other test of the reliability suite must prove a row.
_MATRIX_TESTS = {
    "test_failure_matrix_document_is_generated_from_the_cases",
    "test_every_test_the_matrix_names_exists",
    "test_known_bug_rows_and_only_those_are_strict_xfail",
    "test_matrix_covers_every_input_the_reliability_issue_lists",
    "test_every_reliability_test_proves_a_row",
}


def test_every_reliability_test_proves_a_row() -> None:
    named = {test for case in CASES for test in case.tests}
    suite = ["tests/test_reliability_series.py", "tests/test_reliability_inputs.py", "tests/test_fuzz_loader.py"]
    orphans = [f"{path}::{name}" for path in suite for name in defined_tests(path)
               if name not in _MATRIX_TESTS and f"{path}::{name}" not in named]
    assert not orphans, f"tests that no row of tests/failure_matrix.py names: {orphans}"


def test_known_bug_rows_and_only_those_are_strict_xfail() -> None:
    wrong = []
    for case in CASES:
        for test in case.tests:
            file, name = test.split("::", 1)
            marked = defined_tests(file).get(name.split("[")[0])
            if marked is not None and marked != bool(case.bug):
                row = "a known bug" if case.bug else "proven"
                wrong.append(f"{test}: the row is {row} but the test is {'' if marked else 'not '}xfail")
    assert not wrong, wrong


def test_matrix_covers_every_input_the_reliability_issue_lists() -> None:
    inputs = " ".join(case.bad_input.lower() for case in CASES)
    required = [
        "empty folder", "does not exist", "non-dicom", "truncated", "without pixel data", "one slice", "interleaved",
        "duplicate", "gap", "non-uniform", "matrix sizes", "rescaleslope", "signed / unsigned", "reversed", "shuffled",
        "one decoder rejects", "huge slice counts", "gantry tilt", "wrong shape", "wrong affine", "unknown label",
        "empty mask", "missing columns", "unknown study ids", "duplicated row_ids", "no images", "one broken study",
        "interrupted training", "random byte",
    ]
    assert [r for r in required if r not in inputs] == []
    assert len({(case.area, case.bad_input) for case in CASES}) == len(CASES)  # no row twice

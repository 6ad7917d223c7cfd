"""predict --inputs: any studies (DICOM folder, Enhanced CT, NIfTI, folders of them) → predictions.csv,
with the fallback prior the stage-2 checkpoints store."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.cli import main
from rsna_cspine.constants import REAL_PREVALENCE, TARGET_COLUMNS
from rsna_cspine.inference import PREDICTION_COLUMNS, FracturePipeline, PipelineConfig, predict_dataset, predict_inputs
from rsna_cspine.io.nifti import save_volume_nifti
from rsna_cspine.io.study import load_study
from rsna_cspine.synth.enhanced import write_enhanced_ct
from tests.toy_pipeline import make_tiny_models, write_toy_series

#: The training prevalence the tiny checkpoints store (fold 0, fold 1): the prior is their mean.
STORED = np.array([[0.10, 0.20, 0.05, 0.05, 0.10, 0.15, 0.20, 0.50],
                   [0.20, 0.30, 0.15, 0.05, 0.10, 0.25, 0.30, 0.70]])
CPU = PipelineConfig(device="cpu")


def _store_prevalence(models: Path, prevalences: np.ndarray | None) -> Path:
    """Write each fold's training prevalence into its checkpoint as training does (``extra["prevalence"]``)."""
    for fold, path in enumerate(sorted((models / "cls").rglob("best.pt"))):
        state = torch.load(path, map_location="cpu", weights_only=False)
        extra = dict(state.get("extra") or {})
        extra.pop("prevalence", None)
        if prevalences is not None:
            extra["prevalence"] = prevalences[fold].tolist()
        state["extra"] = extra
        torch.save(state, path)
    return models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return _store_prevalence(make_tiny_models(tmp_path_factory.mktemp("models"), n_folds=2), STORED)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """One study in three forms (DICOM folder, Enhanced CT file, NIfTI file), a second study, a broken file."""
    root = tmp_path_factory.mktemp("studies")
    write_toy_series(root / "dicom", "s1", seed=0)
    write_toy_series(root / "dicom", "s2", seed=1)
    enhanced = write_enhanced_ct(root / "dicom" / "s1", root / "files" / "s1_enhanced.dcm")
    nifti = save_volume_nifti(load_study(root / "dicom" / "s1", workers=1), root / "files" / "s1_nifti.nii.gz")
    broken = root / "niftis" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a NIfTI file")
    return {"dicom": root / "dicom" / "s1", "other": root / "dicom" / "s2", "enhanced": enhanced, "nifti": nifti,
            "folder": root / "niftis"}


def test_one_study_in_any_form_gives_the_same_row_and_a_broken_one_gets_the_stored_prior(
    models: Path, studies: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    inputs = [studies[k] for k in ("dicom", "enhanced", "nifti", "other", "folder")]
    table = predict_inputs(inputs, models, out, cfg=CPU, progress=False)

    written = pd.read_csv(out, keep_default_na=False)
    assert written.columns.tolist() == list(PREDICTION_COLUMNS)
    assert written["study"].tolist() == ["s1", "s1_enhanced", "s1_nifti", "s2", "broken"]
    assert written["status"].tolist() == ["ok", "ok", "ok", "ok", "failed"]
    # Stage 1's quality check reaches the table: one verdict per predicted study, the same for one CT in any form.
    assert all(q.startswith("kept ") for q in written["qc"][:4]) and written["qc"][4] == ""
    assert written["qc"][1] == written["qc"][2] == written["qc"][0]
    probs = written[list(TARGET_COLUMNS)].to_numpy(np.float64)
    # The same CT as a DICOM folder, an Enhanced CT file and a NIfTI file: the same volume, the same numbers.
    np.testing.assert_allclose(probs[1], probs[0], rtol=1e-6)
    np.testing.assert_allclose(probs[2], probs[0], rtol=1e-6)
    # Another CT is seen as another: its stage-1 verdicts and numbers differ (the untrained networks' labels
    # mostly fail the quality check, so most vertebrae of both take the prior).
    assert written["qc"][3] != written["qc"][0] and not np.array_equal(probs[3], probs[0])
    # The failed study gets the prior the checkpoints carry (their mean), not the real prevalence.
    np.testing.assert_allclose(probs[4], STORED.mean(axis=0), rtol=1e-9)
    assert "cannot read NIfTI" in written["reason"][4] and "broken.nii.gz" in written["reason"][4]
    np.testing.assert_allclose(table[list(TARGET_COLUMNS)].to_numpy(np.float64), probs, rtol=1e-12)

    # A rerun resumes every finished study and writes the same table.
    again = predict_inputs(inputs, models, out, cfg=CPU, progress=False)
    np.testing.assert_allclose(again[list(TARGET_COLUMNS)].to_numpy(np.float64), probs, rtol=1e-12)
    timings = pd.read_csv(out.with_name("predictions.timings.csv"))
    assert timings["resumed"].tolist() == [True, True, True, True, False]


def test_command_line_writes_predictions(models: Path, studies: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", "--inputs", str(studies["nifti"]), str(studies["other"]), "--models", str(models),
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert pd.read_csv(out)["study"].tolist() == ["s1_nifti", "s2"]
    assert main(["predict", "--inputs", str(tmp_path / "nowhere"), "--models", str(models), "--out", str(out),
                 "--no-progress"]) == 1


def test_checkpoints_without_a_stored_prevalence_fall_back_to_the_real_one(
    tmp_path: Path, studies: dict[str, Path], caplog
) -> None:
    old = _store_prevalence(make_tiny_models(tmp_path / "old", n_folds=1), None)
    with caplog.at_level(logging.WARNING):
        pipeline = FracturePipeline.from_models_dir(old, CPU)
    np.testing.assert_allclose(pipeline.prior, [REAL_PREVALENCE[c] for c in TARGET_COLUMNS])
    assert any("training prevalence" in r.message for r in caplog.records)
    table = predict_inputs([studies["folder"]], old, tmp_path / "p.csv", progress=False, pipeline=pipeline)
    np.testing.assert_allclose(table[list(TARGET_COLUMNS)].to_numpy(np.float64)[0],
                               [REAL_PREVALENCE[c] for c in TARGET_COLUMNS])


def test_kaggle_layout_with_an_empty_train_csv_predicts_with_the_models_prior(
    models: Path, studies: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    (data / "test_images").mkdir(parents=True)
    (data / "train.csv").write_text("StudyInstanceUID,C1,C2,C3,C4,C5,C6,C7,patient_overall\n")
    uids = ["s2", "gone"]  # "gone" has no images: it gets the prior
    (data / "test_images" / "s2").symlink_to(studies["other"], target_is_directory=True)
    rows = [(f"{u}_{t}", u, t) for u in uids for t in TARGET_COLUMNS]
    pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"]).to_csv(data / "test.csv", index=False)

    submission = predict_dataset(data, models, tmp_path / "submission.csv", cfg=CPU, progress=False)

    values = submission.set_index("row_id")["fractured"]
    np.testing.assert_allclose([values[f"gone_{t}"] for t in TARGET_COLUMNS], STORED.mean(axis=0), rtol=1e-9)
    assert not np.allclose([values[f"s2_{t}"] for t in TARGET_COLUMNS], STORED.mean(axis=0))


def test_explain_takes_a_folder_of_nifti_files(models: Path, studies: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "niftis"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(studies["nifti"].read_bytes())
    assert main(["explain", str(folder), "--models", str(models), "--out", str(tmp_path / "pictures"),
                 "--device", "cpu", "--vertebrae", "C1"]) == 0
    written = pd.read_csv(tmp_path / "pictures" / "a" / "probabilities.csv")
    expected = FracturePipeline.from_models_dir(models, CPU).predict_study(studies["nifti"]).probs
    assert written.shape[0] >= 1 and len(list((tmp_path / "pictures" / "a").glob("*.png"))) >= 2
    assert pytest.approx(expected.tolist(), abs=1e-6) == [
        float(written.set_index(written.columns[0]).iloc[:, 0].get(c, np.nan)) for c in TARGET_COLUMNS]


def test_the_viewer_lists_nifti_files_as_studies(tmp_path: Path, studies: dict[str, Path]) -> None:
    """A NIfTI CT on the shelf is a study of its own (the upload path is tested over HTTP in test_web.py)."""
    from rsna_cspine.report.uploads import list_studies

    shelf = tmp_path / "shelf"
    (shelf / "folder_study").mkdir(parents=True)
    (shelf / "folder_study" / "1.dcm").write_bytes(b"x")
    (shelf / "ct.nii.gz").write_bytes(studies["nifti"].read_bytes())
    (shelf / "notes.txt").write_text("not a study")
    assert list_studies(shelf) == {"ct.nii.gz": shelf / "ct.nii.gz", "folder_study": shelf / "folder_study"}
"""The Kaggle submission notebook, executed end to end with nbclient on a tiny synthetic Kaggle layout.

Its install cell in a fresh virtual environment against a built bundle is tested in test_submission_bundle.py.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

from rsna_cspine.constants import PROB_EPS, REAL_PREVALENCE, TARGET_COLUMNS
from rsna_cspine.pipeline import PipelineConfig, predict_dataset
from tests.paths import NOTEBOOK, REPO_ROOT
from tests.toy_pipeline import GARBAGE, MISSING, assert_prior_submission, make_tiny_dataset, make_tiny_models


def _bundle(root: Path) -> Path:
    """A bundle-like folder: models/ plus SHA256SUMS as build_bundle writes it."""
    bundle = root / "bundle"
    make_tiny_models(bundle / "models")
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(bundle)}\n" for p in files]
    (bundle / "SHA256SUMS").write_text("".join(lines))
    return bundle


def _execute(monkeypatch: pytest.MonkeyPatch, env: dict[str, Path | str]) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    # The kernel spec runs "python" from PATH and imports rsna_cspine from wherever that install points:
    # make it this interpreter and this checkout, so the notebook runs the code under test.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                  os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment, so the parameters cell sees the variables above.
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def test_notebook_is_configured_for_kaggle() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert '"/kaggle/input/rsna-2022-cervical-spine-fracture-detection"' in source
    assert '"/kaggle/working/submission.csv"' in source
    # The install is a real offline pip install from the bundled wheels, the project wheel without deps as fallback.
    assert '"pip", "install", "--no-index", "--find-links", str(WHEELS_DIR), *args]' in source
    assert '_pip_install(["--no-deps", "rsna_cspine"])' in source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it without outputs"
    # The fallback prior needs nothing but the standard library, and is the project's own prior.
    namespace: dict = {}
    exec(notebook.cells[1].source + "\n" + notebook.cells[2].source, namespace)  # parameters, prior
    assert namespace["TARGETS"] == TARGET_COLUMNS
    assert namespace["REAL_PREVALENCE"] == pytest.approx(REAL_PREVALENCE, abs=0, rel=0)
    assert namespace["PROB_EPS"] == PROB_EPS


def test_notebook_runs_end_to_end_on_a_synthetic_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_tiny_dataset(tmp_path / "data")
    bundle = _bundle(tmp_path)
    out = tmp_path / "working" / "submission.csv"
    env = {
        "RSNA_DATA_DIR": data,
        "RSNA_BUNDLE_DIR": bundle,
        "RSNA_OUT_CSV": out,
        "RSNA_DEVICE": "cpu",
        "RSNA_CSPINE_SKIP_INSTALL": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    notebook = _execute(monkeypatch, env)
    submission = pd.read_csv(out, dtype={"row_id": str})
    assert submission["row_id"].tolist() == pd.read_csv(data / "test.csv", dtype=str)["row_id"].tolist()
    # The notebook's numbers are exactly those of the library call it wraps.
    direct = predict_dataset(data, bundle / "models", tmp_path / "direct.csv", cfg=PipelineConfig(device="cpu"), progress=False)
    np.testing.assert_array_equal(submission["fractured"].to_numpy(), direct["fractured"].to_numpy())
    printed = _printed(notebook)
    assert "bundle OK" in printed and "install skipped" in printed
    assert "failed" in printed  # the per-study summary shows the two broken studies' status
    timings = pd.read_csv(out.with_name("submission.timings.csv"), dtype={"StudyInstanceUID": str})
    assert set(timings.loc[timings["status"] == "failed", "StudyInstanceUID"]) == {GARBAGE, MISSING}


def _printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


def test_a_corrupted_bundle_gives_the_prior_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_tiny_dataset(tmp_path / "data")
    bundle = _bundle(tmp_path)
    checkpoint = bundle / "models" / "cls" / "fold0" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    (bundle / "models" / "seg" / "fold0" / "best.pt").unlink()
    out = tmp_path / "working" / "s.csv"
    env = {"RSNA_DATA_DIR": data, "RSNA_BUNDLE_DIR": bundle, "RSNA_OUT_CSV": out, "RSNA_CSPINE_SKIP_INSTALL": "1"}
    printed = _printed(_execute(monkeypatch, env))
    assert_prior_submission(out, data)
    assert "SUBMISSION = TRAINING PRIOR" in printed and "differ from SHA256SUMS" in printed
    assert "models/cls/fold0/best.pt" in printed and "models/seg/fold0/best.pt (unreadable)" in printed
    assert not out.with_name("s.timings.csv").exists()  # the pipeline never ran


def test_a_failing_prediction_gives_the_prior_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A study that fails gets the prior inside the pipeline; this is the whole run refusing to start.
    data = make_tiny_dataset(tmp_path / "data", broken=False)
    out = tmp_path / "s.csv"
    env = {"RSNA_DATA_DIR": data, "RSNA_BUNDLE_DIR": _bundle(tmp_path), "RSNA_OUT_CSV": out,
           "RSNA_CSPINE_SKIP_INSTALL": "1", "RSNA_DEVICE": "cpu", "RSNA_RULE": "median"}  # fmt: skip
    printed = _printed(_execute(monkeypatch, env))
    assert_prior_submission(out, data)
    assert "prediction failed: ConfigError" in printed and "median" in printed

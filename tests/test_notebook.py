"""The Kaggle submission notebook, executed end to end with nbclient on a tiny synthetic Kaggle layout."""

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
from nbclient.exceptions import CellExecutionError

from rsna_cspine.pipeline import PipelineConfig, predict_dataset
from test_pipeline import GARBAGE, MISSING, make_tiny_dataset, make_tiny_models

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "kaggle_submission.ipynb"


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
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
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
    # The install is a real offline pip install from the bundled wheels.
    assert '"pip", "install", "--no-index", "--find-links", str(WHEELS_DIR), "rsna_cspine"' in source
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it without outputs"


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
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "bundle OK" in printed and "install skipped" in printed
    assert "failed" in printed  # the per-study summary shows the two broken studies' status
    timings = pd.read_csv(out.with_name("submission.timings.csv"), dtype={"StudyInstanceUID": str})
    assert set(timings.loc[timings["status"] == "failed", "StudyInstanceUID"]) == {GARBAGE, MISSING}


def test_notebook_stops_on_a_corrupted_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _bundle(tmp_path)
    checkpoint = bundle / "models" / "cls" / "fold0" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    env = {"RSNA_DATA_DIR": tmp_path, "RSNA_BUNDLE_DIR": bundle, "RSNA_OUT_CSV": tmp_path / "s.csv",
           "RSNA_CSPINE_SKIP_INSTALL": "1"}  # fmt: skip
    with pytest.raises(CellExecutionError, match="differ from SHA256SUMS"):
        _execute(monkeypatch, env)
    assert not (tmp_path / "s.csv").exists()

"""submission/build_bundle.py: the offline Kaggle upload folder, its manifest, checksums and wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rsna_cspine.pipeline import FracturePipeline, PipelineConfig
from test_pipeline import make_tiny_models

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "submission" / "build_bundle.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("bundle")
    models = make_tiny_models(root / "models", n_folds=2)
    # A run folder as the trainers leave it: last.pt beside best.pt must not be shipped.
    torch.save({"model": {}}, models / "cls" / "fold0" / "last.pt")
    (models / "cls" / "fold0" / "config.yaml").write_text("fold: 0\n")
    manifest = _load_script().build_bundle(models, root / "out", download_deps=False)
    return models, root / "out", manifest


def test_bundle_holds_wheel_models_configs_and_a_true_manifest(built: tuple[Path, Path, dict]) -> None:
    models, bundle, manifest = built
    files = {entry["path"]: entry for entry in manifest["files"]}
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    assert [w.name for w in wheels] == [f"rsna_cspine-{manifest['rsna_cspine_version']}-py3-none-any.whl"]
    assert {"models/seg/fold0/best.pt", "models/cls/fold0/best.pt", "models/cls/fold1/best.pt"} <= set(files)
    assert "models/cls/fold0/config.yaml" in files and "models/cls/fold0/last.pt" not in files
    assert "kaggle_submission.ipynb" in files
    for config in (REPO / "configs").glob("*.yaml"):
        assert f"configs/{config.name}" in files
    # Every listed size and digest is the file's own, recomputed here.
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS", "manifest.json"}
    assert on_disk == set(files)
    for path, entry in files.items():
        data = (bundle / path).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    sums = dict(line.split("  ")[::-1] for line in (bundle / "SHA256SUMS").read_text().splitlines())
    assert sums["manifest.json"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert {k: v for k, v in sums.items() if k != "manifest.json"} == {p: e["sha256"] for p, e in files.items()}
    assert json.loads((bundle / "manifest.json").read_text())["models"]["cls"] == ["models/cls/fold0/best.pt", "models/cls/fold1/best.pt"]
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    assert manifest["target"] == {"python_version": "3.11", "platform": "manylinux2014_x86_64"}


def test_bundled_checkpoints_are_stripped_and_predict_like_the_originals(built: tuple[Path, Path, dict]) -> None:
    models, bundle, _ = built
    original = torch.load(models / "cls" / "fold1" / "best.pt", weights_only=False)
    shipped = torch.load(bundle / "models" / "cls" / "fold1" / "best.pt", weights_only=False)
    assert shipped["rng"] is None and original["rng"] is not None
    assert shipped["config"] == original["config"]
    for key, tensor in original["model"].items():
        assert torch.equal(shipped["model"][key], tensor)
    pipeline = FracturePipeline.from_models_dir(bundle / "models", PipelineConfig(device="cpu"))
    assert [p.relative_to(bundle / "models") for p in pipeline.classifier_checkpoints] == [
        Path("cls/fold0/best.pt"), Path("cls/fold1/best.pt")
    ]


def test_verify_detects_changed_missing_and_unlisted_files(built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    script = _load_script()
    _, bundle, _ = built
    assert script.verify_bundle(bundle) == []
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    checkpoint = copy / "models" / "seg" / "fold0" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"x")
    (copy / "kaggle_submission.ipynb").unlink()
    (copy / "stray.txt").write_text("?")
    problems = "\n".join(script.verify_bundle(copy))
    assert "best.pt: sha256 differs" in problems
    assert "kaggle_submission.ipynb: listed in SHA256SUMS but missing" in problems
    assert "stray.txt: not listed" in problems
    result = subprocess.run([sys.executable, str(SCRIPT), "--verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 1 and "FAILED" in result.stdout
    result = subprocess.run([sys.executable, str(SCRIPT), "--verify", str(bundle)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK")


def test_refuses_a_non_empty_output_folder(built: tuple[Path, Path, dict]) -> None:
    models, bundle, _ = built
    with pytest.raises(FileExistsError):
        _load_script().build_bundle(models, bundle, download_deps=False)


def test_wheel_installs_offline_into_a_fresh_venv(built: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, bundle, _ = built
    (wheel,) = (bundle / "wheels").glob("rsna_cspine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("pipeline.py", "predict_commands.py", "merge_commands.py", "cli.py", "aggregate.py"):
        assert f"rsna_cspine/{module}" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The notebook's command, minus dependency resolution (the fresh venv has none of them).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps",
         "--find-links", str(bundle / "wheels"), "rsna_cspine"],
        check=True, capture_output=True,
    )  # fmt: skip
    result = subprocess.run(
        [str(python), "-c", "import rsna_cspine; print(rsna_cspine.__version__, rsna_cspine.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    version, location = result.stdout.split()
    assert version == built[2]["rsna_cspine_version"] and location.startswith(str(venv))
    assert (venv / "bin" / "rsna-cspine").is_file()

"""submission/build_bundle.py: the offline Kaggle upload folder, its manifest, checksums and wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rsna_cspine.pipeline import FracturePipeline, PipelineConfig
from tests.paths import NOTEBOOK, REPO_ROOT
from tests.toy_pipeline import assert_prior_submission, make_tiny_dataset, make_tiny_models

SCRIPT = REPO_ROOT / "submission" / "build_bundle.py"


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
    for config in (REPO_ROOT / "configs").glob("*.yaml"):
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
        check=True, capture_output=True, env=_offline_env(),
    )  # fmt: skip
    result = subprocess.run(
        [str(python), "-c", "import rsna_cspine; print(rsna_cspine.__version__, rsna_cspine.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True, env=_offline_env(),  # no PYTHONPATH to the repo
    )  # fmt: skip
    version, location = result.stdout.split()
    assert version == built[2]["rsna_cspine_version"] and location.startswith(str(venv))
    assert (venv / "bin" / "rsna-cspine").is_file()


# ------------------------------------------------------------------- the notebook's install cell, fresh venv


def _wheel_from_installed(name: str, out_dir: Path, version: str | None = None) -> Path:
    """Pack a pure-Python distribution installed here back into a wheel, so the test needs no download.

    Written by hand because no installed tool repacks an installed distribution (``wheel pack`` wants an
    unpacked wheel and is not a dependency). ``version`` relabels it: how the test gets an "old" release.
    """
    import base64
    import importlib.metadata

    dist = importlib.metadata.distribution(name)
    assert "Root-Is-Purelib: true" in dist.read_text("WHEEL") and "py3-none-any" in dist.read_text("WHEEL"), name
    version = version or dist.version
    stem = f"{dist.metadata['Name'].replace('-', '_')}-{version}"
    old_info = next(str(f).split("/")[0] for f in dist.files if str(f).endswith(".dist-info/METADATA"))
    records = []
    wheel = out_dir / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in dist.files:
            parts = entry.parts
            if parts[0] == ".." or "__pycache__" in parts or parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = Path(entry.locate()).read_bytes()
            arcname = str(entry)
            if parts[0] == old_info:
                arcname = f"{stem}.dist-info/" + "/".join(parts[1:])
                if parts[-1] == "METADATA":
                    data = re.sub(rb"(?m)^Version: .*$", f"Version: {version}".encode(), data, count=1)
            zf.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{arcname},sha256={digest},{len(data)}")
        records.append(f"{stem}.dist-info/RECORD,,")
        zf.writestr(f"{stem}.dist-info/RECORD", "\n".join(records) + "\n")
    return wheel


def _offline_env() -> dict[str, str]:
    """This machine's environment without any pip configuration, project path or reachable proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dead = "http://127.0.0.1:9"  # any download attempt fails at once instead of reaching an index
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1",
               HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead)  # fmt: skip
    return env


def _installed(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    result = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True, env=_offline_env())
    return json.loads(result.stdout)


@pytest.mark.slow
def test_notebook_install_cell_in_a_fresh_venv_installs_only_what_is_missing_then_falls_back_to_the_prior(
    built: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """The Kaggle situation: an image with some dependencies (one too old), a bundle with a few wheels,
    minimums nobody can meet offline (torch, numpy, ... are absent here). The notebook's cells, run as they
    are by the venv's Python with ``--no-index``, must upgrade the old one, add the missing one, leave the
    satisfied one alone, install the project wheel without dependencies, and — the project still not
    importable without torch — write the training prior for every row, saying why."""
    import nbformat

    _, bundle_src, manifest = built
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_src, bundle)
    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("tabulate", "tqdm", "pylibjpeg"):  # newer than the venv's / same as the venv's / absent there
        shutil.copy2(_wheel_from_installed(name, extra), bundle / "wheels")
    _load_script().write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_offline_env(), capture_output=True)
    python = venv / "bin" / "python"
    old_tabulate = _wheel_from_installed("tabulate", tmp_path, version="0.8.10")  # below the project's >=0.9
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(old_tabulate),
                    str(extra / next(p.name for p in extra.glob("tqdm-*.whl")))],
                   check=True, env=_offline_env(), capture_output=True)  # fmt: skip
    before = _installed(python, ["tabulate", "tqdm", "pylibjpeg", "rsna_cspine", "numpy", "torch"])
    assert before["tabulate"] == "0.8.10" and before["tqdm"] and before["pylibjpeg"] is None and before["numpy"] is None
    (tqdm_record,) = (venv / "lib").glob("python*/site-packages/tqdm-*.dist-info/RECORD")
    tqdm_stamp = tqdm_record.stat().st_mtime_ns

    data = make_tiny_dataset(tmp_path / "data", broken=False)
    out = tmp_path / "working" / "submission.csv"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    script = tmp_path / "notebook_cells.py"
    script.write_text("\n\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code"))
    env = dict(_offline_env(), RSNA_DATA_DIR=str(data), RSNA_BUNDLE_DIR=str(bundle), RSNA_OUT_CSV=str(out))
    result = subprocess.run([str(python), str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-4000:]

    assert "bundle OK" in printed
    assert re.search(r"tabulate>=0\.9 +have 0\.8\.10 +too old +install from bundle", printed), printed[-4000:]
    assert re.search(r"pylibjpeg>=2\.0 +have None +missing +install from bundle", printed)
    assert re.search(r"tqdm>=4\.66 +have \S+ +ok", printed)
    assert re.search(r"torch>=2\.1 +have None +missing +NO WHEEL IN BUNDLE", printed)
    assert "installing rsna_cspine without dependency checks" in printed and "--no-deps rsna_cspine" in printed
    after = _installed(python, ["tabulate", "tqdm", "pylibjpeg", "rsna_cspine", "numpy", "torch"])
    assert after == {**before, "tabulate": "0.10.0", "pylibjpeg": "2.1.0", "rsna_cspine": manifest["rsna_cspine_version"]}
    assert tqdm_record.stat().st_mtime_ns == tqdm_stamp  # satisfied: not reinstalled
    check = subprocess.run([str(python), "-c", "import tabulate, rsna_cspine; print(tabulate.tabulate([[1, 2]]))"],
                           capture_output=True, text=True, env=_offline_env(), cwd=tmp_path)  # fmt: skip
    assert check.returncode == 0 and "1  2" in check.stdout, check.stderr

    assert "rsna_cspine cannot be imported" in printed and "No module named" in printed
    assert "SUBMISSION = TRAINING PRIOR" in printed
    assert_prior_submission(out, data)

"""Build (or verify) the folder uploaded as the offline Kaggle dataset ``rsna-cspine-bundle``.

    python submission/build_bundle.py --models MODELS --out BUNDLE [--python-version 3.11]
        [--platform manylinux2014_x86_64] [--no-deps-download] [--keep-training-state]
    python submission/build_bundle.py --verify BUNDLE

The bundle holds: ``wheels/`` (the project's wheel and the dependency wheels the Kaggle image lacks,
downloaded for the Kaggle Python with ``pip download --only-binary=:all:``), ``models/`` (the
checkpoints in the layout ``rsna_cspine.pipeline`` reads, stripped of optimiser state unless asked
not to), ``configs/``, the submission notebook, ``manifest.json`` (files, sizes, sha256, versions, git
commit) and ``SHA256SUMS`` (``sha256sum -c`` format). See submission/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rsna_cspine.errors import CSpineError

logger = logging.getLogger("build_bundle")

REPO = Path(__file__).resolve().parent.parent
#: Already in Kaggle's Python image; downloading them (torch alone is gigabytes) would only bloat the bundle.
KAGGLE_PREINSTALLED: tuple[str, ...] = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "matplotlib",
    "pyyaml",
    "tqdm",
)
SUMS_FILE = "SHA256SUMS"
MANIFEST_FILE = "manifest.json"
NOTEBOOK = Path("notebooks") / "kaggle_submission.ipynb"
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def project_dependencies(repo: Path = REPO) -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml (requirement strings).

    Args:
        repo: repository root.
    """
    with (repo / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    logger.info("$ %s", " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")


def build_project_wheel(wheels_dir: Path, repo: Path = REPO) -> Path:
    """``pip wheel --no-deps`` of the project, built from a clean copy so the working tree stays untouched.

    Args:
        wheels_dir: destination folder.
        repo: repository root.
    """
    with tempfile.TemporaryDirectory(prefix="rsna_cspine_src_") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (repo / name).is_file():
                shutil.copy2(repo / name, src / name)
        shutil.copytree(
            repo / "rsna_cspine",
            src / "rsna_cspine",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
        before = set(wheels_dir.glob("rsna_cspine-*.whl"))
        # No build isolation: the build backend (setuptools) comes from this environment, so it works offline.
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels_dir), str(src)])
    built = sorted(set(wheels_dir.glob("rsna_cspine-*.whl")) - before) or sorted(wheels_dir.glob("rsna_cspine-*.whl"))
    if not built:
        raise RuntimeError(f"pip wheel produced no rsna_cspine wheel in {wheels_dir}")
    return built[-1]


def download_dependency_wheels(
    wheels_dir: Path, python_version: str, platform_tag: str, exclude: tuple[str, ...], repo: Path = REPO
) -> list[str]:
    """``pip download --only-binary=:all:`` of the project's direct dependencies for the Kaggle Python.

    Dependencies named in ``exclude`` (Kaggle ships them) are left out; each one is fetched with
    ``--no-deps`` because their own dependencies (numpy, torch, packaging, ...) are in Kaggle's image.

    Args:
        wheels_dir: destination folder.
        python_version: Kaggle's Python, e.g. ``3.11``.
        platform_tag: e.g. ``manylinux2014_x86_64``.
        exclude: distribution names not to download.
        repo: repository root.

    Returns:
        The requirement strings downloaded.
    """
    skip = {_normalise(name) for name in exclude}
    wanted = []
    for requirement in project_dependencies(repo):
        match = _REQUIREMENT_NAME.match(requirement)
        if match and _normalise(match.group(1)) not in skip:
            wanted.append(requirement)
    if wanted:
        _run(
            [
                sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                "--python-version", python_version, "--platform", platform_tag, "--implementation", "cp",
                "-d", str(wheels_dir), *wanted,
            ]
        )
    return wanted


def _strip_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint without what only training needs (optimiser, scheduler, scaler, RNG states)."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=False)
    for key in _TRAINING_STATE:
        if key in state:
            state[key] = None
    torch.save(state, dst)


def copy_models(models_dir: Path, dest: Path, keep_training_state: bool = False) -> dict[str, list[str]]:
    """Copy every checkpoint the pipeline would use (and its run's config.yaml), same relative layout.

    Args:
        models_dir: folder with ``seg/`` and ``cls/`` (see ``rsna_cspine.pipeline``).
        dest: the bundle's ``models/`` folder.
        keep_training_state: keep optimiser/scheduler/RNG states (bigger; only for resuming training).

    Returns:
        ``{"seg": [...], "cls": [...]}`` bundle-relative checkpoint paths.
    """
    from rsna_cspine.pipeline import find_checkpoints

    copied: dict[str, list[str]] = {}
    for stage in ("seg", "cls"):
        copied[stage] = []
        for checkpoint in tqdm(find_checkpoints(models_dir, stage), desc=f"models/{stage}", unit="file", disable=None):
            relative = checkpoint.relative_to(models_dir)
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if keep_training_state:
                shutil.copy2(checkpoint, target)
            else:
                _strip_checkpoint(checkpoint, target)
            run_config = checkpoint.with_name("config.yaml")
            if run_config.is_file() and checkpoint.parent != models_dir / stage:
                shutil.copy2(run_config, target.with_name("config.yaml"))
            copied[stage].append(str(Path("models") / relative))
    return copied


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _wheel_versions(wheels_dir: Path) -> dict[str, str]:
    versions = {}
    for wheel in sorted(wheels_dir.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        versions[_normalise(name)] = version
    return versions


def _bundle_files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != SUMS_FILE)


def write_manifest(bundle: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` (every file with size and sha256, plus ``info``) and ``SHA256SUMS``.

    Args:
        bundle: the bundle folder.
        info: versions, target platform, git commit, models, ...

    Returns:
        The manifest.
    """
    (bundle / MANIFEST_FILE).unlink(missing_ok=True)
    files = [
        {"path": str(p.relative_to(bundle)), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in tqdm(_bundle_files(bundle), desc="checksums", unit="file", disable=None)
    ]
    manifest = {**info, "files": files}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    sums = files + [{"path": MANIFEST_FILE, "sha256": sha256_file(bundle / MANIFEST_FILE)}]
    (bundle / SUMS_FILE).write_text("".join(f"{entry['sha256']}  {entry['path']}\n" for entry in sums))
    return manifest


def verify_bundle(bundle: Path) -> list[str]:
    """Re-check a bundle against its ``SHA256SUMS`` and ``manifest.json``.

    Args:
        bundle: the bundle folder.

    Returns:
        Problems found (empty when the bundle is intact): missing, changed or unlisted files.
    """
    sums_path = bundle / SUMS_FILE
    if not sums_path.is_file():
        return [f"{sums_path}: missing"]
    problems = []
    listed = {}
    for line_no, line in enumerate(sums_path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"{sums_path}:{line_no}: malformed line {line!r}")
            continue
        listed[name] = digest
    for name, digest in listed.items():
        path = bundle / name
        if not path.is_file():
            problems.append(f"{path}: listed in {SUMS_FILE} but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from {SUMS_FILE}")
    for path in _bundle_files(bundle):
        if str(path.relative_to(bundle)) not in listed:
            problems.append(f"{path}: not listed in {SUMS_FILE}")
    manifest_path = bundle / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest.get("files", []):
            if listed.get(entry["path"]) not in (None, entry["sha256"]):
                problems.append(f"{bundle / entry['path']}: manifest and {SUMS_FILE} disagree")
            path = bundle / entry["path"]
            if path.is_file() and path.stat().st_size != entry["size"]:
                problems.append(f"{path}: size differs from the manifest")
    else:
        problems.append(f"{manifest_path}: missing")
    return problems


def build_bundle(
    models_dir: Path,
    out_dir: Path,
    python_version: str = "3.11",
    platform_tag: str = "manylinux2014_x86_64",
    download_deps: bool = True,
    exclude: tuple[str, ...] = KAGGLE_PREINSTALLED,
    keep_training_state: bool = False,
    check_models: bool = True,
    repo: Path = REPO,
) -> dict[str, Any]:
    """Build the upload folder (see the module docstring).

    Args:
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints.
        out_dir: the bundle folder; must be absent or empty.
        python_version: Kaggle's Python version for the dependency wheels.
        platform_tag: pip platform tag of Kaggle's machines.
        download_deps: fetch dependency wheels (needs the package index); off for offline tests.
        exclude: dependencies not to download (already in Kaggle's image).
        keep_training_state: keep optimiser and RNG states in the checkpoints.
        check_models: load the bundled models with ``FracturePipeline`` on CPU before writing the manifest.
        repo: repository root.

    Returns:
        The manifest written.
    """
    models_dir, out_dir = Path(models_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; choose a new folder")
    wheels = out_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    project_wheel = build_project_wheel(wheels, repo)
    logger.info("project wheel: %s", project_wheel.name)
    downloaded = download_dependency_wheels(wheels, python_version, platform_tag, exclude, repo) if download_deps else []
    models = copy_models(models_dir, out_dir / "models", keep_training_state)
    if check_models:
        from rsna_cspine.pipeline import FracturePipeline, PipelineConfig

        FracturePipeline.from_models_dir(out_dir / "models", PipelineConfig(device="cpu"))
        logger.info("bundled models load: %d stage-1, %d stage-2 checkpoints", len(models["seg"]), len(models["cls"]))
    if (repo / "configs").is_dir():
        shutil.copytree(repo / "configs", out_dir / "configs", ignore=shutil.ignore_patterns("*.pyc"))
    for extra in (NOTEBOOK, Path("submission") / "README.md"):
        if (repo / extra).is_file():
            shutil.copy2(repo / extra, out_dir / extra.name)
    import rsna_cspine

    commit = _git("rev-parse", "HEAD", repo=repo)
    status = _git("status", "--porcelain", repo=repo)
    info = {
        "name": "rsna-cspine-bundle",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "rsna_cspine_version": rsna_cspine.__version__,
        "project_wheel": str(project_wheel.relative_to(out_dir)),
        "target": {"python_version": python_version, "platform": platform_tag},
        "builder": {"python": platform.python_version(), "platform": platform.platform()},
        "dependencies_downloaded": downloaded,
        "dependencies_expected_on_kaggle": list(exclude),
        "wheel_versions": _wheel_versions(wheels),
        "models": models,
        "install": "the notebook: pip install --no-index --no-deps --find-links <bundle>/wheels <missing or too-old "
                   "requirements>, then pip install --no-index --find-links <bundle>/wheels rsna_cspine (--no-deps "
                   "when a minimum cannot be met)",
    }
    manifest = write_manifest(out_dir, info)
    logger.info("bundle %s: %d files, %.1f MB", out_dir, len(manifest["files"]), sum(f["size"] for f in manifest["files"]) / 1e6)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line of the script (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with seg/ and cls/ checkpoints")
    parser.add_argument("--out", type=Path, help="bundle folder to create (absent or empty)")
    parser.add_argument("--python-version", default="3.11", help="Kaggle's Python (default 3.11)")
    parser.add_argument("--platform", default="manylinux2014_x86_64", help="pip platform tag of Kaggle")
    parser.add_argument("--no-deps-download", action="store_true", help="only the project wheel (offline/tests)")
    parser.add_argument("--exclude", nargs="*", default=list(KAGGLE_PREINSTALLED), help="dependencies Kaggle already has")
    parser.add_argument("--keep-training-state", action="store_true", help="keep optimiser/RNG state in checkpoints")
    parser.add_argument("--no-model-check", action="store_true", help="do not test-load the bundled models")
    parser.add_argument("--verify", type=Path, metavar="BUNDLE", help="re-check a bundle's checksums and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verify is not None:
        problems = verify_bundle(args.verify)
        for problem in problems:
            print(f"FAILED {problem}")
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.models is None or args.out is None:
        parser.error("--models and --out are required (or --verify BUNDLE)")
    try:
        manifest = build_bundle(
            args.models,
            args.out,
            python_version=args.python_version,
            platform_tag=args.platform,
            download_deps=not args.no_deps_download,
            exclude=tuple(args.exclude),
            keep_training_state=args.keep_training_state,
            check_models=not args.no_model_check,
        )
    except (FileExistsError, RuntimeError, CSpineError) as exc:
        logger.error("%s", exc)
        return 1
    print(f"bundle: {args.out} ({len(manifest['files'])} files); upload it as the Kaggle dataset 'rsna-cspine-bundle'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

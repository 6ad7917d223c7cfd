"""Shared pieces of the benchmark scripts: machine description, result tables and files, synthetic
studies cached on disk and random-weight model folders (peak-memory probes and fresh-process runs: ``probes``).

The scripts import this module as ``common`` (they run as ``python benchmarks/<script>.py``, which puts
``benchmarks/`` first on ``sys.path``). Nothing here is part of the ``rsna_cspine`` package.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Synthetic studies and model folders are cached here (``work/`` is git-ignored).
DEFAULT_WORK = REPO_ROOT / "work" / "bench"
MIB = 1024.0 * 1024.0
#: File name of a synthetic study's true label map, beside its DICOM folder.
SEGMENTATION_FILE = "segmentation.nii"

#: Short codec names (those of ``rsna_cspine.synth.writer.CODECS`` plus ``none``) → readable labels.
CODEC_LABELS: dict[str, str] = {
    "none": "uncompressed (Explicit VR LE)",
    "jpeg_lossless": "JPEG Lossless SV1 (.4.70)",
    "jpeg2000": "JPEG 2000 lossless (.4.90)",
    "rle": "RLE lossless (.5)",
    "jpegls": "JPEG-LS lossless (.4.80)",
}


# ----------------------------------------------------------------------------------------------
# Machine and run description
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> list[float]:
    """``os.getloadavg()`` (1, 5, 15 min) rounded; the machine is shared, so every result records it."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(torch_threads: int | None = None) -> dict[str, Any]:
    """What a figure was measured on: CPU, cores, torch threads, versions, GPU, date and load.

    Args:
        torch_threads: the intra-op threads the measurement used; None reads torch's current setting.
    """
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # platform.platform() would run `uname -p` in a subprocess; os.uname-based calls do not.
        "os": f"{platform.system()} {platform.release()}",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": load_average(),
    }
    try:
        import pydicom

        info["pydicom"] = pydicom.__version__
    except ImportError:
        pass
    return info


def command_line() -> str:
    """The command that ran this script, relative to the repository root, ready to paste."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    python_text = os.path.relpath(sys.executable, REPO_ROOT)
    if python_text.startswith(".."):  # an interpreter outside the repository: whatever `python` is
        python_text = "python"
    return " ".join(shlex.quote(part) for part in [python_text, script_text, *sys.argv[1:]])


# ----------------------------------------------------------------------------------------------
# Tables and result files
# ----------------------------------------------------------------------------------------------


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table.

    Hand-written (10 lines) because ``DataFrame.to_markdown`` needs the ``tabulate`` package, which
    the project does not otherwise use.

    Args:
        columns: header cells.
        rows: one sequence of cells per row (already formatted; anything is passed through ``str``).
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def describe_run(info: dict[str, Any], command: str) -> str:
    """The Markdown lines naming the command, machine, date and load of a run."""
    gpu = f"; GPU {info['gpu']}" if info.get("gpu") else ""
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM{gpu}; "
            f"torch {info['torch']} with {info['torch_threads']} intra-op thread(s); Python {info['python']}",
            f"- date: {info['date']}; load average (1/5/15 min) before the run: "
            + "/".join(f"{v:.2f}" for v in info["loadavg"]),
        ]
    )


def save_results(name: str, info: dict[str, Any], command: str, markdown: str, data: dict[str, Any]) -> Path:
    """Print a run's report and keep it under ``benchmarks/results/``.

    ``<name>.jsonl`` gets one JSON line per run appended (the history); ``<name>.md`` is overwritten
    with this run's Markdown (the latest table).

    Args:
        name: the benchmark's short name (``load``, ``inference``, ...).
        info: :func:`machine_info` of the run.
        command: :func:`command_line` of the run.
        markdown: the tables and notes (printed under the run description).
        data: the raw figures, stored in the JSON line.

    Returns:
        The JSON Lines file.
    """
    text = f"{describe_run(info, command)}\n- load average after the run: " + "/".join(
        f"{v:.2f}" for v in load_average()
    ) + f"\n\n{markdown}\n"
    print(text, flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.md").write_text(text)
    record = {"benchmark": name, "command": command, "machine": info, "loadavg_after": load_average(), **data}
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=json_default) + "\n")
    print(f"results appended to {path.relative_to(REPO_ROOT)}; table in {(RESULTS_DIR / f'{name}.md').relative_to(REPO_ROOT)}")
    return path


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; ``–`` for a missing one."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# Synthetic studies and models, cached on disk
# ----------------------------------------------------------------------------------------------


def synthetic_studies(
    work: Path, n_slices: int, image_size: int, codecs: Sequence[str], seed: int = 0
) -> dict[str, Path]:
    """One phantom study written once per codec, ``{codec: study folder}``; reused when already on disk.

    Beside each study folder: its true label map (``segmentation.nii``, RSNA-style) and ``complete.json``.

    The phantom is the project's generator at a fixed slice count (the slice step adapts to the
    anatomy), so the same pixels are stored under every codec and the decoders get realistic CT
    content (noise, bone, air, circular field of view or not) rather than constant or random pixels.

    Args:
        work: cache root (``<work>/studies/...``).
        n_slices: slices in the series.
        image_size: rows = columns.
        codecs: ``none`` or keys of ``rsna_cspine.synth.writer.CODECS``.
        seed: phantom and storage seed.
    """
    from rsna_cspine.synth import SynthConfig, make_phantom
    from rsna_cspine.synth.writer import (
        available_codecs,
        make_uid,
        plan_storage,
        write_dicom_series,
        write_segmentation,
    )

    folders: dict[str, Path] = {}
    missing = []
    for codec in codecs:
        if codec != "none" and codec not in available_codecs():
            raise SystemExit(f"codec {codec!r} has no working encoder here (available: {available_codecs()})")
        root = work / "studies" / f"{image_size}px_{n_slices}sl_seed{seed}_{codec}"
        uid = make_uid("bench", seed, n_slices, image_size)
        folders[codec] = root / uid
        if not ((root / "complete.json").is_file() and study_segmentation(folders[codec]) is not None):
            missing.append(codec)
    if not missing:
        return folders

    cfg = SynthConfig(image_size=image_size, n_slices=(n_slices, n_slices), seed=seed)
    print(f"generating a {n_slices}×{image_size}² phantom (seed {seed}) for {missing} ...", flush=True)
    tick = time.perf_counter()
    phantom = make_phantom(cfg, np.random.default_rng(seed))
    print(f"  phantom ready in {time.perf_counter() - tick:.0f} s", flush=True)
    for codec in missing:
        compressed = codec != "none"
        storage_cfg = SynthConfig(
            image_size=image_size,
            compressed_fraction=1.0 if compressed else 0.0,
            implicit_vr_fraction=0.0,
            mixed_rescale_fraction=0.0,
            reversed_fraction=0.0,
            shuffled_fraction=0.0,
        )
        storage = plan_storage(phantom, np.random.default_rng(seed + 1), storage_cfg, codecs=(codec,) if compressed else ())
        folder = folders[codec]
        if folder.exists():  # an interrupted earlier write
            for stale in folder.iterdir():
                stale.unlink()
        tick = time.perf_counter()
        write_dicom_series(phantom, folder, folder.name, storage)
        write_segmentation(phantom, folder.parent / SEGMENTATION_FILE, storage)
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / MIB
        print(f"  wrote {codec} ({storage.transfer_syntax}) in {time.perf_counter() - tick:.0f} s, {size_mb:.0f} MiB",
              flush=True)
        marker = {"n_slices": n_slices, "image_size": image_size, "seed": seed, "codec": codec,
                  "transfer_syntax": storage.transfer_syntax, "bits_stored": storage.bits_stored,
                  "pixel_representation": storage.pixel_representation, "spacing_mm": list(phantom.spacing)}
        (folder.parent / "complete.json").write_text(json.dumps(marker, indent=1))
    return folders


def study_segmentation(folder: Path) -> Path | None:
    """The true label map written beside a study of :func:`synthetic_studies` (None when absent)."""
    path = folder.parent / SEGMENTATION_FILE
    return path if path.is_file() else None


def study_bytes(folder: Path) -> int:
    """Total size of a study's files."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm_page_cache(folder: Path) -> None:
    """Read every file once so each timed run starts from the OS page cache, not from the disk."""
    for path in folder.iterdir():
        if path.is_file():
            path.read_bytes()


@dataclass(frozen=True)
class ModelSpec:
    """Which configs the random-weight models are built from.

    Attributes:
        seg_config: stage-1 YAML (``configs/seg.yaml`` = the default 128³ UNet).
        cls_config: stage-2 YAML (``configs/cls_resnet50.yaml`` = resnet50, 15 slices × 5 channels, 224 px).
        seg_overrides: ``key=value`` overrides of the stage-1 config.
        cls_overrides: ``key=value`` overrides of the stage-2 config.
        seed: weight initialisation seed.
    """

    seg_config: str = "configs/seg.yaml"
    cls_config: str = "configs/cls_resnet50.yaml"
    seg_overrides: tuple[str, ...] = ()
    cls_overrides: tuple[str, ...] = ()
    seed: int = 0

    def key(self) -> str:
        """A short stable name for the cache folder."""
        import hashlib

        text = json.dumps([self.seg_config, self.cls_config, self.seg_overrides, self.cls_overrides, self.seed])
        for config in (self.seg_config, self.cls_config):
            text += (REPO_ROOT / config).read_text()
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def random_models(work: Path, spec: ModelSpec) -> Path:
    """A models folder (``seg/fold0/best.pt``, ``cls/fold0/best.pt``) of randomly initialised networks.

    The networks are the ones the configs describe, built by the project's own factories and saved with
    ``engine.save_checkpoint``, so the pipeline loads them exactly like trained ones; untrained weights
    cost the same FLOPs. One fold per stage. Reused when already written for the same configs.

    Args:
        work: cache root (``<work>/models/<key>``).
        spec: configs, overrides and seed.
    """
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.model import build_classifier
    from rsna_cspine.config import load_config, to_dict
    from rsna_cspine.engine import save_checkpoint, seed_everything
    from rsna_cspine.seg.config import SegConfig
    from rsna_cspine.seg.model import build_model
    from rsna_cspine.seg.preprocess import num_classes

    root = work / "models" / spec.key()
    seg_path, cls_path = root / "seg" / "fold0" / "best.pt", root / "cls" / "fold0" / "best.pt"
    if seg_path.is_file() and cls_path.is_file():
        return root
    seed_everything(spec.seed)
    seg = load_config(SegConfig, REPO_ROOT / spec.seg_config, list(spec.seg_overrides))
    extra = {}
    if seg.data.cascade:  # the fine network's checkpoint carries its (here untrained) localiser
        from rsna_cspine.seg.localise import LOCALISER_CLASSES, localiser_checkpoint_entry, localiser_config

        loc = localiser_config(seg)
        extra["localiser"] = localiser_checkpoint_entry(loc, build_model(loc.model, LOCALISER_CLASSES))
    save_checkpoint(seg_path, model=build_model(seg.model, num_classes(seg.data.thoracic)), epoch=0, config=to_dict(seg),
                    extra=extra)
    cls = load_config(ClsConfig, REPO_ROOT / spec.cls_config, list(spec.cls_overrides))
    # Random init: the pretrained file (if any) is never read, so nothing is needed on disk.
    save_checkpoint(cls_path, model=build_classifier(cls, load_pretrained=False), epoch=0, config=to_dict(cls))
    (root / "spec.json").write_text(json.dumps(spec.__dict__, indent=1, default=list))
    return root

"""Data preparation at scale: ``rsna-cspine prepare`` rate, disk per study and the 2,019-study extrapolation.

A Kaggle-layout folder is assembled from synthetic 512² studies of realistic slice counts (200–700, each
stored uncompressed, as JPEG Lossless or as JPEG 2000, with its true segmentation), each study listed
``--copies`` times under other UIDs so that every worker prepares several. The stage-1 input and the
crops follow ``configs/seg.yaml`` (128³) and ``configs/cls_resnet50.yaml`` (15 × 5 × 224 px); the masks
are the true ones (the first ``prepare`` of a real run; stage-1 models add their own time, see
``bench_inference.py``'s segment column). Three runs, each in a fresh process and into a fresh cache:

- 1 worker on a 1-core budget (one study at a time, decoding in-process);
- 1 worker on the whole budget (its decoder processes and torch threads use every core);
- ``cores`` workers, one core each (the default on this machine).

Each run is held to its cores (``sched_setaffinity``): the 1-core run cannot borrow the second core for
any helper thread, so "1 core" is one core. Studies start largest first (as ``prepare`` schedules them).
Besides wall time, every study's CPU time (user + system, ``seconds_cpu`` of the manifest) is reported:
CPU seconds hardly depend on what else the machine runs, wall seconds do. ``CPU s/study`` equal for
1 and 2 workers means the workers do not slow each other down (memory bandwidth, page faults); a
``wall ÷ CPU`` above 1 means studies waited for a core (other load: rerun on a quiet machine).

The in-process runs count how often each series is decoded (the loader's pixel pass, patched): the target
is exactly once. The target rate is ≥ 1.8× the 1-core rate with 2 workers on 2 cores. The wall time and
disk for the 2,019 training studies (~600,000 slices) are extrapolated from seconds per slice, for 2 cores
as measured and for 32 cores from the per-core rate (assuming it holds: memory for 32 studies at once
and disk bandwidth are reported beside it).

    .venv/bin/python benchmarks/bench_prepare.py             # 6 studies × 2 copies at 512², 200–700 slices
    .venv/bin/python benchmarks/bench_prepare.py --quick     # 128², 40–80 slices (smoke run, a few minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import common
import probes

#: 2 workers on 2 cores must reach this many times the rate of one worker on one core.
TARGET_SPEEDUP = 1.8
#: The real training set: studies and slices (DESIGN.md).
REAL_STUDIES, REAL_SLICES = 2019, 600_000
#: (slices, storage) of the studies; every storage appears at several slice counts.
FULL_MIX = ((200, "none"), (300, "jpeg_lossless"), (400, "jpeg2000"), (500, "none"), (600, "jpeg_lossless"),
            (700, "jpeg2000"))
QUICK_MIX = ((40, "none"), (60, "jpeg_lossless"), (80, "jpeg2000"))


def build_layout(work: Path, mix: tuple[tuple[int, str], ...], size: int, copies: int) -> Path:
    """A Kaggle-layout folder whose studies are symbolic links to cached synthetic studies."""
    key = hashlib.sha1(repr((mix, size, copies)).encode()).hexdigest()[:8]
    root = work / f"prepare_layout_{key}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "train_images").mkdir(parents=True)
    (root / "segmentations").mkdir()
    rows = []
    for k, (slices, codec) in enumerate(mix):
        folder = common.synthetic_studies(work, slices, size, [codec], seed=k)[codec]
        for copy in range(copies):
            uid = f"1.2.826.0.1.3680043.99.{k}.{copy}"
            (root / "train_images" / uid).symlink_to(folder, target_is_directory=True)
            (root / "segmentations" / f"{uid}.nii").symlink_to(common.study_segmentation(folder))
            rows.append(f"{uid},0,0,0,0,0,0,0,0")
    (root / "train.csv").write_text("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n" + "\n".join(rows) + "\n")
    return root


def child(layout: Path, out: Path, workers: int, cpus: int) -> None:
    """One measured run (in its own process): wall time, decodes per series, peak memory, the manifest."""
    import rsna_cspine.io.dicom.series as series
    from rsna_cspine.config import load_config
    from rsna_cspine.prepare import PrepareConfig, prepare_dataset
    from rsna_cspine.prepare.config import training_config_overrides

    decodes: dict[str, int] = {}
    original = series.decode_series

    def counting(slices, pool, report):  # runs only in this process: workers > 1 decode elsewhere
        decodes[report.folder.name] = decodes.get(report.folder.name, 0) + 1
        return original(slices, pool, report)

    series.decode_series = counting
    if hasattr(os, "sched_setaffinity"):  # the budget is the hardware too (workers inherit the mask)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    configs = common.REPO_ROOT / "configs"
    overrides = training_config_overrides(configs / "seg.yaml", configs / "cls_resnet50.yaml")
    cfg = load_config(PrepareConfig, None, [*overrides, "mask_source=gt"], values={"workers": workers, "cpus": cpus})
    for path in (layout / "train_images").iterdir():
        common.warm_page_cache(path)
    shutil.rmtree(out, ignore_errors=True)
    tick = time.perf_counter()
    summary = prepare_dataset(layout, out, cfg, progress=False)
    wall = time.perf_counter() - tick
    manifest = summary.manifest
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest finished child (MiB)
    probes.emit_result({
        "workers": summary.workers, "threads": summary.threads, "cpus": cpus, "wall_s": wall,
        # Time the workers were busy with studies; the rest of the wall time is start-up (spawning workers
        # that import torch, planning) and the tail where some workers have nothing left to do.
        "busy_s": float(manifest["seconds_total"].sum()) / summary.workers,
        "cpu_s": float(manifest["seconds_cpu"].sum()),  # user + system of every study (its process and decoders)
        "studies": int(summary.done), "failed": summary.failed, "slices": int(manifest["n_slices"].sum()),
        "bytes": int(manifest["bytes"].sum()), "decodes": decodes if summary.workers == 1 else None,
        "peak_rss_mib": probes.peak_rss_mib() if summary.workers == 1 else worker_peak,
        "median_s": {step: float(manifest[f"seconds_{step}"].median())
                     for step in ("load", "stage1", "mask", "crops", "total")},
        "outputs": hashlib.sha1(manifest[["StudyInstanceUID", "n_slices", "n_present", "seg_file", "crop_file"]]
                                .to_csv(index=False).encode()).hexdigest(),
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128², 40–80 slices: a smoke run")
    parser.add_argument("--copies", type=int, default=2, help="times each study is listed (under other UIDs)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache of synthetic studies")
    parser.add_argument("--child", nargs=4, metavar=("LAYOUT", "OUT", "WORKERS", "CPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]), int(args.child[3]))
        return 0

    cores = common.usable_cores()
    info = common.machine_info()
    mix, size = (QUICK_MIX, 128) if args.quick else (FULL_MIX, 512)
    layout = build_layout(args.work, mix, size, args.copies)
    runs = []
    for workers, cpus in ((1, 1), (1, cores), (cores, cores)):
        print(f"== {workers} worker(s) on {cpus} core(s)", flush=True)
        runs.append(probes.run_fresh(Path(__file__), ["--child", str(layout), str(args.work / "prepare_out"),
                                                      str(workers), str(cpus)]))
    shutil.rmtree(args.work / "prepare_out", ignore_errors=True)

    problems = []
    n = len(mix) * args.copies
    for run in runs:
        if run["failed"] or run["studies"] != n:
            problems.append(f"{run['workers']} worker(s): {run['studies']} of {n} studies prepared, failed {run['failed']}")
        if run["decodes"] is not None and run["decodes"] != {f"1.2.826.0.1.3680043.99.{k}.{c}": 1 for k in range(len(mix))
                                                             for c in range(args.copies)}:
            problems.append(f"{run['workers']} worker(s) on {run['cpus']} core(s): decodes per series {run['decodes']}")
    if len({run["outputs"] for run in runs}) != 1:
        problems.append("the runs wrote different studies")
    base = runs[0]
    rows, data = [], {"mix": mix, "image_size": size, "copies": args.copies, "runs": runs}
    # Rates are steady-state: studies per busy second of the workers (start-up is shown apart; it does not
    # grow with the number of studies, so it does not enter the extrapolation).
    rate = {id(run): run["studies"] / run["busy_s"] * 3600 for run in runs}
    for run in runs:
        name = f"{run['workers']} × {run['threads']} thread(s) on {run['cpus']} core(s)"
        rows.append([name, common.fmt(run["wall_s"], 1),
                     common.fmt(run["wall_s"] - run["busy_s"], 1), common.fmt(rate[id(run)], 0),
                     common.fmt(rate[id(run)] / rate[id(base)], 2), common.fmt(run["busy_s"] / run["slices"] * 1000, 1),
                     common.fmt(run["cpu_s"] / run["studies"], 2),
                     common.fmt(run["busy_s"] * run["workers"] / run["cpu_s"], 2),
                     common.fmt(run["bytes"] / run["studies"] / 1e6, 1), common.fmt(run["peak_rss_mib"], 0),
                     "1 each" if run["decodes"] and set(run["decodes"].values()) == {1} else "–"])
    best, per_core = runs[-1], base["busy_s"] / base["slices"]
    gb_per_study = best["bytes"] / best["studies"] / 1e9
    # 2 cores: the measured rate where this machine has 2; else, like 32 cores, the 1-core rate per slice × cores.
    hours_2 = REAL_SLICES * (best["busy_s"] / best["slices"] if cores == 2 else per_core / 2) / 3600
    hours_32 = REAL_SLICES * per_core / 32 / 3600
    speedup = rate[id(best)] / rate[id(base)]
    # The rate each run would reach if its studies never waited for a core: workers × studies per CPU second.
    waited = max(run["busy_s"] * run["workers"] / run["cpu_s"] for run in runs)
    cpu_rate = {id(run): run["workers"] * run["studies"] / run["cpu_s"] for run in runs}
    cpu_speedup = cpu_rate[id(best)] / cpu_rate[id(base)]
    data.update(speedup=speedup, cpu_speedup=cpu_speedup, gb_per_study=gb_per_study, hours_2_cores=hours_2,
                hours_32_cores=hours_32, disk_gb=REAL_STUDIES * gb_per_study)
    if cores >= 2 and speedup < TARGET_SPEEDUP:
        problems.append(f"{cores} workers reach {speedup:.2f}× the 1-core rate (target ≥ {TARGET_SPEEDUP}×)")
    markdown = "\n".join([
        f"{n} studies ({', '.join(f'{s}×{size}² {c}' for s, c in mix)}, each × {args.copies}); stage-1 input 128³, "
        "crops 15 × 5 × 224 px (configs/seg.yaml, configs/cls_resnet50.yaml), true masks.",
        "",
        common.markdown_table(["run", "wall s", "start-up s", "studies/h", "× 1 core", "busy ms/slice", "CPU s/study",
                               "wall ÷ CPU", "MB/study", "peak MiB/process", "decodes per series"], rows),
        "",
        f"- {cores} workers vs 1 worker on 1 core: **{speedup:.2f}×** (target ≥ {TARGET_SPEEDUP}×); by CPU time "
        f"(each worker on a core of its own, nothing else running) **{cpu_speedup:.2f}×**",
        *([f"- **not a quiet machine**: studies waited for a core (wall ÷ CPU up to {waited:.2f}); the wall rates "
           "are low by that much, rerun when nothing else runs"] if waited > 1.1 else []),
        f"- disk: {gb_per_study * 1000:.1f} MB per study → **{REAL_STUDIES * gb_per_study:.0f} GB** for "
        f"{REAL_STUDIES:,} studies",
        f"- {REAL_STUDIES:,} studies (~{REAL_SLICES:,} slices): **{hours_2:.1f} h on 2 cores** (2 workers; "
        f"{'measured' if cores == 2 else 'from the 1-core'} rate per slice); **{hours_32:.1f} h on 32 cores** "
        f"(32 workers at the 1-core rate per slice; needs "
        f"≈ {32 * best['peak_rss_mib'] / 1024:.0f} GiB for 32 studies at once and "
        f"{REAL_STUDIES * gb_per_study / max(hours_32 * 3600, 1e-9) * 1000:.0f} MB/s of writes)",
        "- medians per study (s), "
        + ", ".join(f"{k} {v:.2f}" for k, v in best["median_s"].items()) + f" ({best['workers']} workers)",
    ])  # fmt: skip
    if args.quick:
        markdown += "\n- `--quick`: 128² studies of 40–80 slices; the rates and extrapolations are not the real ones."
    common.save_results("prepare", info, common.command_line(), markdown, data)
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

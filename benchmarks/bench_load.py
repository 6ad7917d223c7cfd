"""DICOM series load speed: ``rsna_cspine.io.dicom.load_series`` against a naive pydicom loop.

For each storage (uncompressed, JPEG Lossless, JPEG 2000) one synthetic 512×512 study is written once
(cached under ``work/bench``), then timed, interleaved, ``--repeats`` times each:

- naive: ``dcmread`` + ``pixel_array`` per file, rescale to HU, sort by ImagePositionPatient after
  (what most public notebooks do; one process);
- ``load_series(workers=1)``: the project's loader on one core (header pass, in-process decode);
- ``load_series()``: the loader with its default worker pool (both cores here).

Every loaded volume must equal the naive one exactly (same HU, same superior→inferior order). The
target is the default loader ≥ 1.5× the naive loop's slices/s. Medians over the repeats are reported,
with the CPU seconds each loader used (this process and its worker processes): on a shared machine
they show what the wall times would be once the cores are free. For JPEG 2000 the naive loop itself
uses two cores: GDCM, pydicom's first-choice decoder, decodes JPEG 2000 on two threads.

    .venv/bin/python benchmarks/bench_load.py             # 200 slices per series, 3 repeats
    .venv/bin/python benchmarks/bench_load.py --quick     # 24 slices, 1 repeat (smoke run)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import common

#: Target of the issue: the default loader (both cores) at least this many times the naive loop.
TARGET_SPEEDUP = 1.5
DEFAULT_CODECS = ("none", "jpeg_lossless", "jpeg2000")


def naive_load(folder: Path) -> np.ndarray:
    """The baseline: read and decode each file with pydicom, rescale, then sort superior → inferior.

    Args:
        folder: one series.

    Returns:
        float32 ``(z, y, x)`` HU, z from the highest ImagePositionPatient z down.
    """
    import pydicom

    slices = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda item: -item[0])
    return np.stack([hu for _, hu in slices])


def default_workers(workers: int | None) -> int:
    """Processes ``load_series(workers=...)`` decodes with: its documented default is min(CPUs, 4)."""
    return workers if workers is not None else min(common.usable_cores(), 4)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_call(fn, *args, **kwargs) -> tuple[float, float, object]:  # noqa: ANN001 - any callable
    """Wall seconds and CPU seconds (worker processes included) one call takes, and its result."""
    cpu = cpu_seconds()
    tick = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - tick, cpu_seconds() - cpu, result


def bench_codec(folder: Path, repeats: int, workers: int | None) -> dict:
    """Time the three loaders on one series and check that they agree.

    Args:
        folder: the series.
        repeats: timed rounds (each round runs the three loaders once, interleaved, so a load spike
            on the shared machine hits all three alike).
        workers: the pooled loader's ``workers`` (None = its default).
    """
    from rsna_cspine.io.dicom import load_series

    common.warm_page_cache(folder)
    times: dict[str, list[float]] = {"naive": [], "loader_1": [], "loader_n": []}
    cpu: dict[str, list[float]] = {key: [] for key in times}
    identical = True
    n_slices = 0
    for _ in range(repeats):
        seconds, cpu_used, reference = time_call(naive_load, folder)
        times["naive"].append(seconds)
        cpu["naive"].append(cpu_used)
        n_slices = len(reference)
        for key, n_workers in (("loader_1", 1), ("loader_n", workers)):
            seconds, cpu_used, volume = time_call(load_series, folder, workers=n_workers)
            times[key].append(seconds)
            cpu[key].append(cpu_used)
            same = volume.hu.shape == reference.shape and np.array_equal(volume.hu, reference)
            if not same:
                print(f"  MISMATCH: {key} differs from the naive loop on {folder}", file=sys.stderr)
            identical &= same
            del volume
        del reference
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "folder": str(folder),
        "n_slices": n_slices,
        "bytes": common.study_bytes(folder),
        "workers": default_workers(workers),
        "seconds": times,
        "median_s": medians,
        "cpu_seconds": cpu,
        "median_cpu_s": {key: statistics.median(values) for key, values in cpu.items()},
        "slices_per_s": {key: n_slices / value for key, value in medians.items()},
        "speedup_1": medians["naive"] / medians["loader_1"],
        "speedup_n": medians["naive"] / medians["loader_n"],
        "identical": identical,
    }


def render(results: dict[str, dict], n_workers: int) -> str:
    """The Markdown table (absolutes and ratios) and a verdict line."""
    rows = []
    for codec, r in results.items():
        sps = r["slices_per_s"]
        verdict = "yes" if r["speedup_n"] >= TARGET_SPEEDUP and r["identical"] else "**no**"
        rows.append(
            [
                common.CODEC_LABELS.get(codec, codec),
                r["n_slices"],
                common.fmt(r["bytes"] / common.MIB, 0),
                f"{common.fmt(r['median_s']['naive'], 2)} s / {sps['naive']:.0f}",
                f"{common.fmt(r['median_s']['loader_1'], 2)} s / {sps['loader_1']:.0f} (×{r['speedup_1']:.2f})",
                f"{common.fmt(r['median_s']['loader_n'], 2)} s / {sps['loader_n']:.0f} (×{r['speedup_n']:.2f})",
                "yes" if r["identical"] else "**NO**",
                verdict,
            ]
        )
    columns = [
        "series (512² slices)",
        "slices",
        "MiB",
        "naive pydicom loop: time / slices·s⁻¹",
        "load_series 1 worker (× naive)",
        f"load_series {n_workers} workers (× naive)",
        "identical arrays",
        f"≥ {TARGET_SPEEDUP}×",
    ]
    cpu_lines = [
        f"- {common.CODEC_LABELS.get(codec, codec)}: naive {r['median_cpu_s']['naive']:.2f} s, 1 worker "
        f"{r['median_cpu_s']['loader_1']:.2f} s, {n_workers} workers {r['median_cpu_s']['loader_n']:.2f} s"
        for codec, r in results.items()
    ]
    return common.markdown_table(columns, rows) + (
        "\n\nMedians over the repeats; every run's volume compared with the naive loop's by `np.array_equal`."
        "\n\nCPU seconds per load (this process and its worker processes), medians:\n" + "\n".join(cpu_lines)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200, help="slices per series")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS),
                        help=f"storages to time: none or synth codec names (default {' '.join(DEFAULT_CODECS)})")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per series (median reported)")
    parser.add_argument("--workers", type=int, default=None, help="load_series workers (default: its own default)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache of synthetic studies")
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 slices, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.repeats = min(args.slices, 24), 1

    info = common.machine_info()
    command = common.command_line()
    folders = common.synthetic_studies(args.work, args.slices, args.size, args.codecs, args.seed)
    results = {}
    for codec, folder in folders.items():
        print(f"timing {codec}: {folder}", flush=True)
        results[codec] = bench_codec(folder, args.repeats, args.workers)
    n_workers = default_workers(args.workers)
    title = f"### DICOM series load ({args.slices} slices of {args.size}², {args.repeats} repeat(s))\n\n"
    common.save_results("load", info, command, title + render(results, n_workers),
                        {"args": vars(args) | {"work": str(args.work)}, "results": results})
    ok = all(r["identical"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

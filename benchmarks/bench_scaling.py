"""How per-study inference time and memory grow with the slice count (default 200 / 500 / 800 slices).

The same full-pipeline measurement as ``bench_inference.py`` (fresh process per study, default stage
configs with random weights, medians over the timed runs) on synthetic 512² studies of increasing
length. A straight line ``time = a + b × slices`` is fitted by least squares: the intercept ``a`` is
the work that does not depend on the length (the UNet on its fixed 128³ grid, the classifier on a fixed
7 × 15 slices), the slope ``b`` the per-slice work (decoding, resampling, upsampling the mask,
cropping). R² near 1 and small residuals mean the growth is linear.

    .venv/bin/python benchmarks/bench_scaling.py                   # 200, 500, 800 slices on CPU
    .venv/bin/python benchmarks/bench_scaling.py --device cuda --amp
    .venv/bin/python benchmarks/bench_scaling.py --quick           # 32 / 64 / 96 slices, 1 run each
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

import bench_inference
import common


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares ``y = a + b x``: intercept, slope, R² and the largest residual relative to ``y``."""
    slope, intercept = np.polyfit(x, y, 1)
    predicted = intercept + slope * x
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - predicted) ** 2).sum()) / total if total > 0 else 1.0
    return {"intercept": float(intercept), "slope": float(slope), "r2": r2,
            "max_rel_residual": float(np.max(np.abs(y - predicted) / y))}


def render(counts: list[int], summaries: list[dict[str, Any]], fit: dict[str, float], memory_fit: dict[str, float]) -> str:
    """The curve (absolutes, ratios to the shortest study) and the fitted line."""
    base_n, base_t = counts[0], summaries[0]["total_s"]
    rows = []
    for n, s in zip(counts, summaries):
        stages = " / ".join(common.fmt(s["stage_s"][stage], 2) for stage in bench_inference.STAGES)
        rows.append([
            n, common.fmt(s["total_s"], 2), stages, f"{n / base_n:.2f}", f"{s['total_s'] / base_t:.2f}",
            common.fmt(fit["intercept"] + fit["slope"] * n, 2), f"{s['peak_total_mib'] / 1024:.2f}",
            f"{s['vertebrae_found']}/7",
        ])
    columns = ["slices", "s / study", "load / segment / crop / classify (s)", "slices ÷ first",
               "time ÷ first", "linear fit (s)", "peak memory (GiB)", "vertebrae found"]
    return common.markdown_table(columns, rows) + (
        f"\n\nFit: time ≈ {fit['intercept']:.2f} s + {1000 * fit['slope']:.2f} ms × slices "
        f"(R² = {fit['r2']:.4f}, largest residual {100 * fit['max_rel_residual']:.1f} % of the time); "
        f"peak memory ≈ {memory_fit['intercept']:.0f} MiB + {memory_fit['slope']:.2f} MiB × slices "
        f"(R² = {memory_fit['r2']:.4f})."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200, 500, 800], help="slice counts")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--codec", default="none", help="storage of the studies: none, jpeg_lossless, ...")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed predictions per study")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions per study (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache of studies and models")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32/64/96 slices, no warm-up, 1 run")
    bench_inference.add_model_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.warmup, args.repeats = [32, 64, 96], 0, 1
    counts = sorted(args.slices)
    if len(counts) < 2:
        parser.error("give at least two slice counts")
    threads = args.threads or common.usable_cores()

    info = common.machine_info(threads)
    command = common.command_line()
    models = common.random_models(args.work, bench_inference.model_spec(args))
    results, summaries = [], []
    for n in counts:
        study = common.synthetic_studies(args.work, n, args.size, [args.codec], args.seed)[args.codec]
        print(f"measuring {n} slices on {args.device} ...", flush=True)
        result = bench_inference.measure(study, models, args.device, threads, args.amp, args.warmup, args.repeats,
                                         args.cpu_bf16)
        results.append(result)
        summaries.append(bench_inference.summarise(result))
    x = np.array(counts, dtype=float)
    fit = linear_fit(x, np.array([s["total_s"] for s in summaries]))
    memory_fit = linear_fit(x, np.array([s["peak_total_mib"] for s in summaries]))
    device_text = args.device + (" + AMP" if args.amp and args.device.startswith("cuda") else "")
    device_text += " + stage-2 bf16" if args.cpu_bf16 and not args.device.startswith("cuda") else ""
    title = (f"### Scaling with slice count ({device_text}, {threads} torch threads, {args.size}² "
             f"{common.CODEC_LABELS.get(args.codec, args.codec)}, {args.warmup} warm-up + {args.repeats} timed run(s))\n\n")
    common.save_results("scaling", info, command, title + render(counts, summaries, fit, memory_fit),
                        {"args": vars(args) | {"work": str(args.work)}, "counts": counts, "summaries": summaries,
                         "fit": fit, "memory_fit": memory_fit, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

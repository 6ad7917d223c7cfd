"""Training throughput on CPU: stage-1 volumes/s and stage-2 crops/s, and how long each step waits for data.

Each (stage, config) pair runs in a fresh process on a small synthetic Kaggle-layout dataset (written
once, cached under ``work/bench``): the stage's own cache is built first (grid-resolution volumes for
stage 1, vertebra crops for stage 2, untimed), then the one training loop's epoch function
(``training.loop.train_one_epoch``) runs the stage's own task (``seg.task.SegmentationTask`` /
``cls.task.VertebraTask``: model, loss, loader) over that task's loader,
wrapped so that the time spent inside ``next(loader)`` (waiting for data) and the time between two
batches (forward, loss, backward, optimiser step) are recorded for every step. The first
``--warmup-steps`` steps (allocator growth, oneDNN kernel choice, loader workers starting) are left
out of the figures.

Reported per stage and config:

- throughput: items (volumes or vertebra crops) per second of training;
- data wait: share of step time spent in ``next(loader)`` — the GPU-idle-equivalent: on an accelerator
  this is the share of time the device would sit idle;
- loader alone: items/s the same loader produces with no model attached, and its ratio to the
  training rate — the speed-up of the step the loader could keep up with (e.g. a GPU).

    .venv/bin/python benchmarks/bench_training.py              # CPU and default configs, both stages
    .venv/bin/python benchmarks/bench_training.py --quick      # CPU configs, 3 steps each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import probes

#: Config pairs by name: (stage-1 YAML, stage-2 YAML).
CONFIG_SETS: dict[str, tuple[str, str]] = {
    "cpu": ("configs/seg_cpu.yaml", "configs/cls_cpu.yaml"),
    "default": ("configs/seg.yaml", "configs/cls_resnet50.yaml"),
}


class TimedLoader:
    """Wraps a loader: yields at most ``limit`` batches and records, per batch, the wait and the step.

    ``wait[k]`` is the time ``next()`` took for batch ``k`` (the first one includes starting the
    loader's workers); ``step[k]`` is the time from handing batch ``k`` out to being asked for the next
    one, i.e. the consumer's work on it.

    Args:
        loader: any iterable of batches with ``len``.
        limit: most batches to yield.
        count: items in a batch (its batch dimension).
    """

    def __init__(self, loader: Any, limit: int, count: Any) -> None:
        self.loader = loader
        self.limit = limit
        self.count = count
        self.wait: list[float] = []
        self.step: list[float] = []
        self.items: list[int] = []

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def __iter__(self) -> Iterator[Any]:
        tick = time.perf_counter()
        iterator = iter(self.loader)
        for _ in range(len(self)):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            handed_out = time.perf_counter()
            self.wait.append(handed_out - tick)
            self.items.append(int(self.count(batch)))
            yield batch
            tick = time.perf_counter()
            self.step.append(tick - handed_out)


def summarise_steps(timed: TimedLoader, warmup: int) -> dict[str, Any]:
    """Throughput and wait share over the steps after the first ``warmup``."""
    n = min(len(timed.wait), len(timed.step))
    keep = range(min(warmup, max(n - 1, 0)), n)
    wait = sum(timed.wait[k] for k in keep)
    step = sum(timed.step[k] for k in keep)
    items = sum(timed.items[k] for k in keep)
    return {
        "steps_timed": len(keep),
        "items_timed": items,
        "wait_s": wait,
        "step_s": step,
        "items_per_s": items / (wait + step) if wait + step > 0 else float("nan"),
        "wait_fraction": wait / (wait + step) if wait + step > 0 else float("nan"),
        "median_step_s": statistics.median(timed.wait[k] + timed.step[k] for k in keep) if keep else float("nan"),
        "warmup_steps_s": [timed.wait[k] + timed.step[k] for k in range(0, keep.start)],
    }


def loader_alone(make_loader: Any, limit: int, count: Any, warmup: int) -> dict[str, Any]:
    """Items/s of a fresh loader iterated with no model (nothing but ``next``)."""
    timed = TimedLoader(make_loader(), limit, count)
    for _ in timed:
        pass
    summary = summarise_steps(timed, warmup)
    return {"items_per_s": summary["items_per_s"], "items_timed": summary["items_timed"]}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def synthetic_dataset(work: Path, n_studies: int, image_size: int, seed: int) -> Path:
    """A fully segmented training layout (no test split), reused when already complete."""
    import pandas as pd

    from rsna_cspine.synth import SynthConfig, write_dataset

    root = work / "train_data" / f"{n_studies}studies_{image_size}px_seed{seed}"
    if (root / "train.csv").is_file() and len(pd.read_csv(root / "train.csv")) == n_studies:
        return root
    print(f"writing {n_studies} synthetic training studies ({image_size}²) to {root} ...", flush=True)
    # Every study gets a fracture somewhere so both labels occur in a handful of vertebrae.
    cfg = SynthConfig(n_studies=n_studies, seed=seed, image_size=image_size, test_fraction=0.0,
                      segmentation_fraction=1.0, prevalence_scale=3.0)
    write_dataset(root, cfg, overwrite=True)
    return root


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------


def _time_steps(task: Any, cfg: Any, steps: int, warmup: int) -> tuple[Any, Any]:
    """Run ``steps + warmup`` training steps of ``task`` through the loop's epoch function, timing each."""
    import torch

    from rsna_cspine.engine import DistContext, make_grad_scaler
    from rsna_cspine.training.loop import make_optimizer, make_scheduler, train_one_epoch

    device, ctx = torch.device("cpu"), DistContext()
    epoch_counter = iter(range(10**6))

    def new_loader() -> Any:
        # A fresh loader per epoch, as the loop builds one.
        return task.train_loader(next(epoch_counter), ctx)

    optimizer = make_optimizer(task.model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.epochs, len(new_loader()))
    count = lambda batch: batch["image"].shape[0]  # noqa: E731
    timed = TimedLoader(_Epochs(new_loader, steps + warmup), steps + warmup, count)
    train_one_epoch(task.model, timed, task, optimizer, scheduler, make_grad_scaler(device, cfg.train.amp), device,
                    cfg.train, epoch=0, ctx=ctx, progress=False)
    alone = loader_alone(lambda: _Epochs(new_loader, steps + warmup), steps + warmup, count, warmup)
    return timed, alone


def measure_seg(config: str, overrides: list[str], data: Path, work: Path, steps: int, warmup: int,
                num_workers: int | None) -> dict[str, Any]:
    """Stage-1 training steps on CPU with the trainer's task (model, loss, loader) and epoch function."""
    import torch

    from rsna_cspine.config import load_config
    from rsna_cspine.engine import seed_everything
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.seg.config import SegConfig
    from rsna_cspine.seg.preprocess import build_cache
    from rsna_cspine.seg.task import SegmentationTask
    from rsna_cspine.seg.train import cascade_geometry, labelled_studies, resolve_config

    cfg = resolve_config(load_config(SegConfig, common.REPO_ROOT / config, overrides))
    if num_workers is not None:
        cfg.train.num_workers = num_workers
    uids = labelled_studies(data)
    cascade = cascade_geometry(cfg)  # the fine network's steps (the localiser's are a fraction of them)
    grid_name = "x".join(str(int(g)) for g in cfg.data.grid) + ("_cascade" if cascade else "")
    cache = build_cache(KaggleLayout(data), uids, work / "seg_cache" / f"{data.name}_{grid_name}", cfg.data.grid,
                        cfg.data.hu_window, antialias=cfg.data.antialias, progress=False, cascade=cascade)
    paths = [cache[u] for u in uids if u in cache]
    seed_everything(cfg.seed)
    task = SegmentationTask(cfg, paths, [], torch.device("cpu"), progress=False,
                            source="fine" if cascade else "grid")
    timed, alone = _time_steps(task, cfg, steps, warmup)
    patch = tuple(int(p) if p else int(g) for p, g in zip(cfg.train.patch_size, cfg.data.grid))
    return {
        "stage": "seg",
        "config": config,
        "overrides": overrides,
        "item": f"volume {'×'.join(map(str, patch))}",
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.train.num_workers,
        "n_studies": len(paths),
        "train": summarise_steps(timed, warmup),
        "loader_alone": alone,
        "peak_rss_mib": probes.peak_rss_mib(),
    }


class _Epochs:
    """Chains fresh loaders (one per epoch) so a few studies give as many steps as asked."""

    def __init__(self, new_loader: Any, batches: int) -> None:
        self.new_loader = new_loader
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Any]:
        given = 0
        while given < self.batches:
            for batch in self.new_loader():
                yield batch
                given += 1
                if given >= self.batches:
                    return


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------


def measure_cls(config: str, overrides: list[str], data: Path, work: Path, steps: int, warmup: int,
                num_workers: int | None) -> dict[str, Any]:
    """Stage-2 training steps on CPU with the trainer's task (model, loss, dataset, loader) and epoch function."""
    import torch

    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.task import VertebraTask
    from rsna_cspine.cls.train import fold_split
    from rsna_cspine.config import load_config
    from rsna_cspine.crops.cache import build_crop_cache
    from rsna_cspine.engine import seed_everything
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels

    cfg = load_config(ClsConfig, common.REPO_ROOT / config, overrides)
    cfg.device, cfg.fold, cfg.model.pretrained_file = "cpu", -1, None  # every study trains; random init
    if num_workers is not None:
        cfg.train.num_workers = num_workers
    cfg.validate()
    layout = KaggleLayout(data)
    labels = read_train_labels(layout.train_csv)
    crop = cfg.data.crop
    crop_name = f"{crop.n_slices}x{crop.in_chans}x{crop.size}"
    index = build_crop_cache(layout, labels["StudyInstanceUID"].tolist(), "gt",
                             work / "crop_cache" / f"{data.name}_{crop_name}", crop)
    cfg.data.root = str(data)
    split = fold_split(cfg, index)
    seed_everything(cfg.seed)
    task = VertebraTask(cfg, split, torch.device("cpu"))
    timed, alone = _time_steps(task, cfg, steps, warmup)
    in_memory_note = " (in memory after first read)" if cfg.data.in_memory else ""
    return {
        "stage": "cls",
        "config": config,
        "overrides": overrides,
        "item": f"vertebra crop {crop.n_slices}×{crop.in_chans}×{crop.size}²{in_memory_note}",
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.train.num_workers,
        "n_studies": int((index["status"] != "failed").sum()),
        "n_items": len(split.train),
        "train": summarise_steps(timed, warmup),
        "loader_alone": alone,
        "peak_rss_mib": probes.peak_rss_mib(),
    }


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def render(results: list[dict[str, Any]], threads: int) -> str:
    """Markdown table: throughput, step time, data wait and the loader-alone rate."""
    rows = []
    for r in results:
        train, alone = r["train"], r["loader_alone"]
        ratio = alone["items_per_s"] / train["items_per_s"] if train["items_per_s"] > 0 else float("nan")
        rows.append([
            "1 (segmentation)" if r["stage"] == "seg" else "2 (classifier)",
            f"`{r['config']}`" + (f" {' '.join(r['overrides'])}" if r["overrides"] else ""),
            r["item"],
            f"{r['batch_size']} / {r['num_workers']}",
            f"{train['items_per_s']:.3g}",
            common.fmt(train["median_step_s"], 2),
            f"{100 * train['wait_fraction']:.1f} %",
            f"{alone['items_per_s']:.3g} (×{ratio:.0f})",
            f"{r['peak_rss_mib'] / 1024:.2f}",
            f"{train['steps_timed']}",
        ])
    columns = ["stage", "config", "item", "batch / loader workers", "items/s (train)", "s / step (median)",
               "data wait (share of step time)", "loader alone: items/s (× train rate)", "peak RSS (GiB)",
               "steps timed"]
    return common.markdown_table(columns, rows) + (
        f"\n\nCPU only, {threads} torch threads. *Data wait* = time in `next(loader)` ÷ total step time "
        "(GPU-idle-equivalent). *Loader alone* = the same loader with no model; its ratio to the training "
        "rate is how much faster a step could get (on a GPU) before data loading becomes the bottleneck."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["cpu", "default"], choices=sorted(CONFIG_SETS),
                        help="config sets to measure: cpu (seg_cpu + cls_cpu), default (seg + cls_resnet50)")
    parser.add_argument("--stages", nargs="+", default=["seg", "cls"], choices=["seg", "cls"])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement (cpu configs)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the figures")
    parser.add_argument("--default-steps", type=int, default=3,
                        help="timed steps for the default (GPU-sized) configs, ~1 min each on 2 cores; 1 warm-up")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument("--studies", type=int, default=6, help="synthetic training studies")
    parser.add_argument("--size", type=int, default=256, help="synthetic image size (caches are resampled anyway)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="cache of data and preprocessed files")
    parser.add_argument("--set", nargs="*", default=[], metavar="STAGE:KEY=VALUE",
                        help="config overrides, e.g. seg:train.batch_size=1 cls:train.batch_size=4")
    parser.add_argument("--quick", action="store_true", help="smoke run: cpu configs, 4 studies, 3 steps")
    parser.add_argument("--child", choices=["seg", "cls"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or common.usable_cores()
    overrides = {stage: [item.split(":", 1)[1] for item in args.set if item.startswith(stage + ":")]
                 for stage in ("seg", "cls")}

    if args.child:
        import torch

        torch.set_num_threads(threads)
        measure = measure_seg if args.child == "seg" else measure_cls
        probes.emit_result(measure(args.config, overrides[args.child], args.data, args.work, args.steps,
                                   args.warmup_steps, args.num_workers))
        return 0
    if args.quick:
        args.configs, args.studies, args.steps, args.warmup_steps = ["cpu"], min(args.studies, 4), 3, 1

    info = common.machine_info(threads)
    command = common.command_line()
    data = synthetic_dataset(args.work, args.studies, args.size, args.seed)
    results = []
    for config_set in args.configs:
        steps, warmup = (args.default_steps, 1) if config_set == "default" else (args.steps, args.warmup_steps)
        for stage in args.stages:
            config = CONFIG_SETS[config_set][0 if stage == "seg" else 1]
            print(f"measuring stage {stage} with {config} ({warmup} + {steps} steps) ...", flush=True)
            child_args = ["--child", stage, "--config", config, "--data", str(data), "--work", str(args.work),
                          "--steps", str(steps), "--warmup-steps", str(warmup), "--threads", str(threads)]
            if args.num_workers is not None:
                child_args += ["--num-workers", str(args.num_workers)]
            if args.set:
                child_args += ["--set", *args.set]
            results.append(probes.run_fresh(Path(__file__), child_args))
    title = (f"### Training throughput on CPU ({threads} torch threads; {args.studies} synthetic studies)\n\n")
    common.save_results("training", info, command, title + render(results, threads),
                        {"args": vars(args) | {"work": str(args.work)}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

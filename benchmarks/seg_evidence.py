"""Evidence for stage 1 on synthetic data: train on CPU within a time budget, score held-out studies.

Two jobs:

``accuracy`` (default): writes two synthetic Kaggle-layout datasets with different seeds (one to train
on, one held out, both fully segmented), trains ``train-seg`` on fold 0 of the first with a time budget,
predicts every held-out study at its original resolution and prints the mean Dice and the share of
vertebrae whose slice range is within ``--tolerance`` slices of the truth::

    .venv/bin/python benchmarks/seg_evidence.py --config configs/seg_cpu.yaml \
        --train-studies 40 --train-seed 101 --heldout-studies 12 --heldout-seed 202 --max-minutes 15

``memory``: peak resident memory of ``load_series`` + ``Segmenter.predict`` for one large study
(default 700 slices of 512×512) in a fresh process::

    .venv/bin/python benchmarks/seg_evidence.py memory --config configs/seg.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger("seg_evidence")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_synthetic(out_dir: Path, n_studies: int, seed: int, image_size: int) -> Path:
    """A fully segmented synthetic training layout (no test split), reused when already complete."""
    from rsna_cspine.synth import SynthConfig, write_dataset

    if (out_dir / "train.csv").is_file() and len(pd.read_csv(out_dir / "train.csv")) == n_studies:
        log.info("reusing %s", out_dir)
        return out_dir
    cfg = SynthConfig(n_studies=n_studies, seed=seed, image_size=image_size, test_fraction=0.0,
                      segmentation_fraction=1.0)
    t0 = time.perf_counter()
    write_dataset(out_dir, cfg)
    log.info("wrote %d studies to %s in %.0f s", n_studies, out_dir, time.perf_counter() - t0)
    return out_dir


def score_heldout(checkpoint: Path, data_dir: Path, tolerance: int) -> pd.DataFrame:
    """Predict every study of ``data_dir`` and compare with its segmentation; one row per vertebra."""
    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.seg import evaluate_segmentation, load_segmenter

    layout = KaggleLayout(data_dir)
    segmenter = load_segmenter(checkpoint, "cpu")
    rows = []
    for uid in read_train_labels(layout.train_csv)["StudyInstanceUID"].astype(str):
        volume = load_series(layout.study_dir(uid, "train"))
        truth = load_segmentation(layout.segmentation_path(uid), volume)
        t0 = time.perf_counter()
        result = segmenter.predict(volume)
        seconds = time.perf_counter() - t0
        scores = evaluate_segmentation(result.mask, truth)
        for name, dice in scores["dice"].items():
            if math.isnan(scores["z_error"][name]):
                continue  # not in the truth (cannot happen with the synthetic C1..C7, kept for safety)
            rows.append({"StudyInstanceUID": uid, "vertebra": name, "dice": dice,
                         "z_error": scores["z_error"][name], "shape": "x".join(map(str, volume.shape)),
                         "predict_s": seconds})
    table = pd.DataFrame(rows)
    table["within_tolerance"] = table["z_error"] <= tolerance
    return table


def accuracy(args: argparse.Namespace) -> int:
    import torch

    from rsna_cspine.config import load_config
    from rsna_cspine.prepare import prepare_config_for, prepare_dataset
    from rsna_cspine.seg import SegConfig, train_segmentation

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train_dir = write_synthetic(work / "train_data", args.train_studies, args.train_seed, args.image_size)
    heldout_dir = write_synthetic(work / "heldout_data", args.heldout_studies, args.heldout_seed, args.image_size)
    run_dir = work / "run" / "fold0"
    cfg = load_config(SegConfig, args.config, args.overrides,
                      values={"data": {"root": train_dir, "cache_dir": work / "cache"}, "run_dir": run_dir.parent,
                              "train": {"max_minutes": args.max_minutes, "threads": args.threads}, "device": "cpu",
                              "fold": 0})
    if (run_dir / "last.pt").exists() and not args.resume:
        raise SystemExit(f"{run_dir} already holds a run; delete it or pass --resume")
    t0 = time.perf_counter()
    prepare_dataset(train_dir, cfg.data.cache_dir, prepare_config_for(cfg, segmented_only=True),
                    progress=not args.no_progress)  # the trainer reads the prepared cache only
    train_segmentation(cfg, resume=args.resume, progress=not args.no_progress)
    wall_min = (time.perf_counter() - t0) / 60
    summary = pd.read_csv(run_dir / "summary.csv")
    train_min = summary["time_s"].sum() / 60
    table = score_heldout(run_dir / "best.pt", heldout_dir, args.tolerance)
    table.to_csv(work / "heldout_scores.csv", index=False)
    per_study = table.groupby("StudyInstanceUID")["dice"].mean()
    best = summary.loc[summary["val_dice_mean"].idxmax()]
    report = {
        "config": str(args.config),
        "train_studies": args.train_studies,
        "fold0_train_val": None,
        "heldout_studies": int(per_study.size),
        "epochs_run": int(summary["epoch"].max()),
        "best_epoch": int(best["epoch"]),
        "best_val_dice_mean_grid": round(float(best["val_dice_mean"]), 4),
        "training_minutes": round(float(train_min), 2),
        "wall_minutes_incl_cache": round(float(wall_min), 2),
        "torch_threads": args.threads,
        "heldout_mean_dice": round(float(per_study.mean()), 4),
        "heldout_min_study_dice": round(float(per_study.min()), 4),
        "heldout_dice_per_vertebra": table.groupby("vertebra")["dice"].mean().round(4).to_dict(),
        f"share_within_{args.tolerance}_slices": round(float(table["within_tolerance"].mean()), 4),
        "vertebrae_scored": int(len(table)),
        "max_z_error": float(table["z_error"].max()),
        "predict_s_per_study": round(float(table.groupby("StudyInstanceUID")["predict_s"].first().mean()), 2),
    }
    import torch as _torch

    extra = _torch.load(run_dir / "last.pt", weights_only=False)["extra"]
    report["fold0_train_val"] = [len(extra.get("train_uids", [])), len(extra.get("val_uids", []))]
    print(json.dumps(report, indent=2))
    return 0


def memory_child(args: argparse.Namespace) -> int:
    """Runs in a fresh process: load one big study and predict it, then print peak RSS."""
    import torch

    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.seg import load_segmenter

    torch.set_num_threads(args.threads)
    after_import = peak_rss_mib()
    segmenter = load_segmenter(args.checkpoint, "cpu")
    t0 = time.perf_counter()
    volume = load_series(args.study)
    load_s = time.perf_counter() - t0
    after_load = peak_rss_mib()
    t0 = time.perf_counter()
    result = segmenter.predict(volume)
    predict_s = time.perf_counter() - t0
    print(json.dumps({
        "shape": list(volume.shape), "grid": list(segmenter.grid), "mask_shape": list(result.mask.shape),
        "rss_after_imports_mib": round(after_import), "peak_rss_after_load_mib": round(after_load),
        "peak_rss_mib": round(peak_rss_mib()), "load_s": round(load_s, 1), "predict_s": round(predict_s, 1),
        "torch_threads": args.threads,
    }, indent=2))
    return 0


def memory(args: argparse.Namespace) -> int:
    import torch

    from rsna_cspine.config import load_config, to_dict
    from rsna_cspine.engine import save_checkpoint
    from rsna_cspine.seg import SegConfig
    from rsna_cspine.seg.model import build_model
    from rsna_cspine.seg.preprocess import num_classes
    from rsna_cspine.synth import SynthConfig, write_dataset

    work = Path(args.work)
    data = work / "memory_data"
    if not (data / "train.csv").is_file():
        # Linux carries ru_maxrss across fork + exec: a child started after this big write would report
        # the writer's peak, so the measurement is left to the next call.
        log.warning("writing the study first; run the memory job again for a clean peak-RSS figure")
        n = args.slices
        write_dataset(data, SynthConfig(n_studies=1, seed=5, image_size=args.size, n_slices=(n, n),
                                        test_fraction=0.0, compressed_fraction=0.0))
        return 0
    uid = pd.read_csv(data / "train.csv")["StudyInstanceUID"].astype(str).iloc[0]
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / "memory_model.pt"
    if not args.checkpoint:
        cfg = load_config(SegConfig, args.config)
        torch.manual_seed(0)  # weights do not change the memory footprint; the architecture does
        save_checkpoint(checkpoint, model=build_model(cfg.model, num_classes(cfg.data.thoracic)), epoch=0,
                        config=to_dict(cfg))
    cmd = [sys.executable, __file__, "memory-child", "--study", str(data / "train_images" / uid),
           "--checkpoint", str(checkpoint), "--threads", str(args.threads)]
    return subprocess.call(cmd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="accuracy", choices=("accuracy", "memory", "memory-child"))
    parser.add_argument("--config", default="configs/seg_cpu.yaml")
    parser.add_argument("--work", default="work/seg_evidence")
    parser.add_argument("--train-studies", type=int, default=40)
    parser.add_argument("--train-seed", type=int, default=101)
    parser.add_argument("--heldout-studies", type=int, default=12)
    parser.add_argument("--heldout-seed", type=int, default=202)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--tolerance", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--slices", type=int, default=700, help="memory: slices of the big study")
    parser.add_argument("--size", type=int, default=512, help="memory: in-plane size of the big study")
    parser.add_argument("--checkpoint", default=None, help="memory: model to use (default: untrained, --config)")
    parser.add_argument("--study", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. --set train.epochs=20")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"accuracy": accuracy, "memory": memory, "memory-child": memory_child}[args.job](args)


if __name__ == "__main__":
    sys.exit(main())

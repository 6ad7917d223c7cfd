"""Evidence for stage 1: train on CPU within a time budget, score held-out synthetic studies, and run the
trained model on every real file of ``../shared/data/real``.

Three jobs:

``accuracy`` (default): writes two synthetic Kaggle-layout datasets with different seeds (one to train
on, one held out, both fully segmented, the generator's default field-of-view mix), trains
``train-seg`` on fold 0 of the first with a time budget, predicts every held-out study at its original
resolution and prints the mean Dice (of the network's labels, and of what the anatomical QC keeps),
the share of vertebrae whose slice range is within ``--tolerance`` slices of the truth, how often
the localiser's box held the whole cervical spine, and what the QC kept and dropped. Resumable: the
data, the cache and (with ``--resume``) the training pick up where they stopped::

    .venv/bin/python benchmarks/seg_evidence.py --config configs/seg_cpu.yaml \
        --train-studies 60 --train-seed 101 --heldout-studies 24 --heldout-seed 202 --max-minutes 15

Training uses the config's CPU plan (``train.threads``, ``train.num_workers``) unless ``--threads`` /
``--workers`` are given.

``real`` (in ``seg_real.py``): the QC verdicts of a trained stage-1 checkpoint on every real file (the partial RSNA series,
TotalSegmentator's abdominal CT, pydicom's single slices, each as a one-slice series) and one overview
picture per real series with the predicted labels (``results/seg_real_*.png``)::

    .venv/bin/python benchmarks/seg_evidence.py real --checkpoint work/seg_evidence/run/fold0/best.pt

``memory``: peak resident memory of ``load_series`` + ``Segmenter.predict`` for one large study
(default 700 slices of 512×512) in a fresh process::

    .venv/bin/python benchmarks/seg_evidence.py memory --config configs/seg.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger("seg_evidence")
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The shared real files, beside the repository (never copied into it).
REAL_DIR = REPO_ROOT.parent / "shared" / "data" / "real"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the loader processes,
    which the trainer starts for each epoch and joins at its end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
    """Predict every study of ``data_dir`` and compare with its segmentation; one row per true vertebra.

    Each row holds the Dice of the network's labels (``dice``, before the QC) and of what the QC kept
    (``dice_qc``), the slice-range error, whether the vertebra is whole in the truth (not cut by the
    scan's first or last slice), the QC's verdict, whether a kept vertebra's centroid lies within 9 mm of
    the true one, and whether the localiser's box held the study's whole cervical spine.

    ``in_view`` is the QC's own verdict on the *true* vertebra (``qc.check_vertebrae`` on the truth's
    table): False for a sliver the scan's edge cuts below the QC's coverage rule (e.g. 10 mm of C5 in a
    9-slice slab, where the rule asks for 14). The pipeline must withhold such a vertebra (it takes the
    prior), so its Dice of 0 is the right answer, not a miss; :func:`summarise` scores it as a refusal.
    """
    import numpy as np

    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.seg import evaluate_segmentation, load_segmenter
    from rsna_cspine.seg.masks import mask_table
    from rsna_cspine.seg.preprocess import fold_labels
    from rsna_cspine.seg.qc import KEPT, check_vertebrae

    layout = KaggleLayout(data_dir)
    fov = {}
    if (data_dir / "synth_studies.csv").is_file():
        meta = pd.read_csv(data_dir / "synth_studies.csv", dtype={"StudyInstanceUID": str})
        fov = dict(zip(meta["StudyInstanceUID"], meta["fov"]))
    segmenter = load_segmenter(checkpoint, "cpu")
    rows = []
    for uid in read_train_labels(layout.train_csv)["StudyInstanceUID"].astype(str):
        volume = load_series(layout.study_dir(uid, "train"))
        truth = fold_labels(load_segmentation(layout.segmentation_path(uid), volume))
        t0 = time.perf_counter()
        raw = segmenter.segment(volume)
        raw_scores = evaluate_segmentation(raw.mask, truth)
        result = segmenter.check(raw, volume)
        seconds = time.perf_counter() - t0
        scores = evaluate_segmentation(result.mask, truth)
        true_table = check_vertebrae(mask_table(truth), volume.spacing, volume.shape).set_index("vertebra")
        table = result.vertebrae.set_index("vertebra")
        spacing = np.asarray(volume.spacing)
        in_box = False
        if result.box is not None:
            inside = np.zeros(volume.shape, bool)
            inside[tuple(slice(max(a, 0), a + n) for a, n in zip(result.box.start, result.box.size))] = True
            in_box = bool(not (truth[~inside] > 0).any())
        for name, dice in raw_scores["dice"].items():
            if math.isnan(raw_scores["z_error"][name]):
                continue  # not in the truth (a slab above or below it)
            t, p = true_table.loc[name], table.loc[name]
            kept = p["qc"] == "ok"
            offset = float("nan")
            if kept:
                offset = float(np.linalg.norm(
                    (np.array([p[f"centroid_{k}"] for k in "zyx"]) - np.array([t[f"centroid_{k}"] for k in "zyx"])) * spacing))
            rows.append({"StudyInstanceUID": uid, "fov": fov.get(uid, ""), "vertebra": name, "dice": dice,
                         "dice_qc": scores["dice"][name], "z_error": raw_scores["z_error"][name],
                         "whole": bool(int(t["z_min"]) > 0 and int(t["z_max"]) < volume.shape[0] - 1),
                         "in_view": t["qc"] == KEPT, "truth_qc": t["qc"],
                         "qc": p["qc"], "kept": kept, "centroid_offset_mm": offset, "neck_in_box": in_box,
                         "shape": "x".join(map(str, volume.shape)), "predict_s": seconds})
    table = pd.DataFrame(rows)
    table["within_tolerance"] = table["z_error"] <= tolerance
    return table


def summarise(table: pd.DataFrame, tolerance: int) -> dict:
    """The held-out figures of :func:`score_heldout`'s table.

    The Dice figures count the true vertebrae the QC's coverage rule calls in view (``in_view``); a
    study is the mean of its own. A true vertebra out of view (a sliver at the scan's edge) is scored as
    a refusal instead: ``out_of_view_withheld`` is the share of them the QC removed. Every true vertebra
    with its Dice (out-of-view ones at whatever the network gave them) is in
    ``heldout_mean_dice_every_true_vertebra``, the definition used before 2026-12-06.
    """
    everything = table.groupby("StudyInstanceUID")["dice"].mean()
    studies = table.groupby("StudyInstanceUID").first()
    whole = table[table["whole"]]
    cut = table[~table["whole"]]  # cut by the scan's edge (in view or not): the QC's coverage rule decides
    out_of_view = table[~table["in_view"]]
    table = table[table["in_view"]]
    per_study = table.groupby("StudyInstanceUID")[["dice", "dice_qc"]].mean()
    kept = table[table["kept"]]
    by_fov = {fov: {"studies": int(len(group.groupby("StudyInstanceUID"))),
                    "dice": round(float(group.groupby("StudyInstanceUID")["dice"].mean().mean()), 4),
                    "whole_vertebrae_kept": round(float(group.loc[group["whole"], "kept"].mean()), 4)
                    if group["whole"].any() else None}
              for fov, group in table.groupby("fov")}
    return {
        "heldout_studies": int(per_study.shape[0]),
        "heldout_mean_dice": round(float(per_study["dice"].mean()), 4),
        "heldout_min_study_dice": round(float(per_study["dice"].min()), 4),
        "heldout_mean_dice_after_qc": round(float(per_study["dice_qc"].mean()), 4),
        "heldout_dice_per_vertebra": table.groupby("vertebra")["dice"].mean().round(4).to_dict(),
        "heldout_mean_dice_every_true_vertebra": round(float(everything.mean()), 4),
        "heldout_studies_every_true_vertebra": int(everything.shape[0]),
        "out_of_view_vertebrae": [f"{u[-8:]} {v}: {q}" for u, v, q in
                                  zip(out_of_view["StudyInstanceUID"], out_of_view["vertebra"], out_of_view["truth_qc"])],
        "out_of_view_withheld": round(float((~out_of_view["kept"]).mean()), 4) if len(out_of_view) else None,
        f"share_within_{tolerance}_slices": round(float(table["within_tolerance"].mean()), 4),
        "vertebrae_scored": int(len(table)),
        "max_z_error": float(table["z_error"].max()),
        "neck_in_localiser_box": round(float(studies["neck_in_box"].mean()), 4),
        "qc_whole_vertebrae_kept": round(float(whole["kept"].mean()), 4) if len(whole) else None,
        "qc_cut_vertebrae_dropped": round(float(1 - cut["kept"].mean()), 4) if len(cut) else None,
        "qc_cut_vertebrae": int(len(cut)),
        "kept_within_9mm_of_true_centroid": round(float((kept["centroid_offset_mm"] <= 9.0).mean()), 4)
        if len(kept) else None,
        "by_fov": by_fov,
        "predict_s_per_study": round(float(studies["predict_s"].mean()), 2),
    }


def accuracy(args: argparse.Namespace) -> int:
    import torch

    from rsna_cspine.config import load_config
    from rsna_cspine.prepare import prepare_config_for, prepare_dataset
    from rsna_cspine.seg import SegConfig, train_segmentation

    work = Path(args.work)
    load_before = os.getloadavg()
    train_dir = write_synthetic(work / "train_data", args.train_studies, args.train_seed, args.image_size)
    heldout_dir = write_synthetic(work / "heldout_data", args.heldout_studies, args.heldout_seed, args.image_size)
    run_dir = work / "run" / "fold0"
    # The config's CPU plan (configs/seg_cpu.yaml: one model thread beside one loader process) unless
    # --threads / --workers say otherwise.
    train = {"max_minutes": args.max_minutes}
    if args.threads is not None:
        train["threads"] = args.threads
    if args.workers is not None:
        train["num_workers"] = args.workers
    cfg = load_config(SegConfig, args.config, args.overrides,
                      values={"data": {"root": train_dir, "cache_dir": work / "cache"}, "run_dir": run_dir.parent,
                              "train": train, "device": "cpu", "fold": 0})
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if (run_dir / "last.pt").exists() and not args.resume:
        raise SystemExit(f"{run_dir} already holds a run; delete it or pass --resume")
    # The cache first, so that --max-minutes is spent on training alone (both networks); its time is reported.
    t0 = time.perf_counter()
    prepare_dataset(train_dir, cfg.data.cache_dir, prepare_config_for(cfg, segmented_only=True),
                    progress=not args.no_progress)  # the trainer reads the prepared cache only
    cache_min = (time.perf_counter() - t0) / 60
    cpu_before = cpu_seconds()
    train_segmentation(cfg, resume=args.resume, progress=not args.no_progress)
    cpu_after = cpu_seconds()
    wall_min = (time.perf_counter() - t0) / 60
    load_after_training = os.getloadavg()
    summary = pd.read_csv(run_dir / "summary.csv")
    train_min = summary["time_s"].sum() / 60
    localiser_min = 0.0
    if (run_dir / "localiser" / "summary.csv").is_file():
        localiser_summary = pd.read_csv(run_dir / "localiser" / "summary.csv")
        localiser_min = localiser_summary["time_s"].sum() / 60
    table = score_heldout(run_dir / "best.pt", heldout_dir, args.tolerance)
    table.to_csv(work / "heldout_scores.csv", index=False)
    best = summary.loc[summary["val_dice_mean"].idxmax()]
    report = {
        "config": str(args.config),
        "train_studies": args.train_studies,
        "fold0_train_val": None,
        "epochs_run": int(summary["epoch"].max()),
        "best_epoch": int(best["epoch"]),
        "best_val_dice_mean_grid": round(float(best["val_dice_mean"]), 4),
        "training_minutes": round(float(train_min + localiser_min), 2),
        "localiser_training_minutes": round(float(localiser_min), 2),
        "cache_minutes": round(float(cache_min), 2),
        # CPU time of the training (both networks, loader processes included), comparable between runs on
        # a loaded machine; with a loader process beside the network it exceeds the wall time.
        "training_cpu_minutes": round((cpu_after - cpu_before) / 60, 2),
        "wall_minutes_incl_cache": round(float(wall_min), 2),
        "torch_threads": torch.get_num_threads(),
        "loader_workers": cfg.train.num_workers,
        "val_every": cfg.train.val_every,
        **summarise(table, args.tolerance),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after_training": [round(v, 2) for v in load_after_training],
        "cpu_cores": os.cpu_count(),
    }
    import torch as _torch

    extra = _torch.load(run_dir / "last.pt", weights_only=False)["extra"]
    report["fold0_train_val"] = [len(extra.get("train_uids", [])), len(extra.get("val_uids", []))]
    print(json.dumps(report, indent=2))
    (work / "report.json").write_text(json.dumps(report, indent=1))
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
        from rsna_cspine.seg.localise import LOCALISER_CLASSES, localiser_checkpoint_entry, localiser_config

        cfg = load_config(SegConfig, args.config)
        torch.manual_seed(0)  # weights do not change the memory footprint; the architecture does
        extra = {}
        if cfg.data.cascade:  # an untrained localiser finds "a neck" somewhere: the fine pass still runs
            loc = localiser_config(cfg)
            extra["localiser"] = localiser_checkpoint_entry(loc, build_model(loc.model, LOCALISER_CLASSES))
        save_checkpoint(checkpoint, model=build_model(cfg.model, num_classes(cfg.data.thoracic)), epoch=0,
                        config=to_dict(cfg), extra=extra)
    cmd = [sys.executable, __file__, "memory-child", "--study", str(data / "train_images" / uid),
           "--checkpoint", str(checkpoint), "--threads", str(args.threads)]
    return subprocess.call(cmd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", nargs="?", default="accuracy", choices=("accuracy", "real", "memory", "memory-child"))
    parser.add_argument("--config", default="configs/seg_cpu.yaml")
    parser.add_argument("--work", default="work/seg_evidence")
    parser.add_argument("--train-studies", type=int, default=40)
    parser.add_argument("--train-seed", type=int, default=101)
    parser.add_argument("--heldout-studies", type=int, default=12)
    parser.add_argument("--heldout-seed", type=int, default=202)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--tolerance", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (accuracy: default the config's train.threads; real, memory: 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="accuracy: loader processes (default the config's train.num_workers)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--slices", type=int, default=700, help="memory: slices of the big study")
    parser.add_argument("--size", type=int, default=512, help="memory: in-plane size of the big study")
    parser.add_argument("--checkpoint", default=None,
                        help="real: the trained stage-1 best.pt; memory: model to use (default: untrained, --config)")
    parser.add_argument("--real-dir", default=str(REAL_DIR), help="real: the shared real files")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="real: where results go")
    parser.add_argument("--study", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable), e.g. --set train.epochs=20")
    args = parser.parse_args()
    if args.job != "accuracy" and args.threads is None:
        args.threads = 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.job == "real":
        from seg_real import real  # the real files' QC verdicts and pictures

        return real(args)
    return {"accuracy": accuracy, "memory": memory, "memory-child": memory_child}[args.job](args)


if __name__ == "__main__":
    sys.exit(main())

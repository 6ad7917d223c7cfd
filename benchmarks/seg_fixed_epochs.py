"""Stage-1 training changes compared at equal work: the cascade's fine network for a fixed number of epochs
behind one shared localiser, its CPU minutes and its held-out Dice.

``seg_evidence.py`` trains within a wall-clock budget, so on a shared, loaded CPU two runs of the same
code get different epoch counts. Here the epochs are fixed and the CPU time of the training is measured
(``getrusage``), so runs made side by side on a busy machine compare. The localiser is trained once
(``WORK/localiser.pt``, ``--loc-epochs``) and reused by every run of the same ``WORK``, so runs differ only
in the fine network. ``WORK`` holds ``train_data/`` and ``heldout_data/`` (``seg_evidence.py`` writes them
with its seeds) and the prepared cache ``cache/`` (made here when missing). Compare two code versions by
running this script from each checkout; one run::

    .venv/bin/python benchmarks/seg_fixed_epochs.py --work work/seg_ev --out work/seg_ev/fixed_a --epochs 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import seg_evidence  # the held-out scoring (score_heldout, summarise)


def cpu_minutes(before: float) -> float:
    """CPU minutes (user + system) since ``before`` (``seg_evidence.cpu_seconds``: loader processes included)."""
    return (seg_evidence.cpu_seconds() - before) / 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder with train_data/, heldout_data/ (and cache/)")
    parser.add_argument("--out", required=True, help="this run's folder (run/, heldout_scores.csv, report.json)")
    parser.add_argument("--config", default="configs/seg_cpu.yaml")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of the fine network (its cosine schedule)")
    parser.add_argument("--loc-epochs", type=int, default=20, help="epochs of the shared localiser (first run only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from rsna_cspine.config import load_config
    from rsna_cspine.engine import load_checkpoint, seed_everything
    from rsna_cspine.engine.runlog import prepare_run_dir
    from rsna_cspine.prepare import prepare_config_for, prepare_dataset
    from rsna_cspine.seg import SegConfig
    from rsna_cspine.seg.localise import CHECKPOINT_KEY, localiser_checkpoint_entry, localiser_config
    from rsna_cspine.seg.task import SegmentationTask
    from rsna_cspine.seg.train import resolve_config, segmentation_data, split_studies
    from rsna_cspine.training.loop import fit

    torch.set_num_threads(1)
    device = torch.device("cpu")
    work, out = Path(args.work), Path(args.out)
    cfg = resolve_config(load_config(SegConfig, args.config, args.overrides, values={
        "data": {"root": work / "train_data", "cache_dir": work / "cache"}, "run_dir": out / "run", "device": "cpu",
        "fold": 0, "train": {"max_minutes": 0.0, "epochs": args.epochs, "threads": 1}}))
    if not cfg.data.cascade:
        raise SystemExit(f"{args.config} has no cascade (data.spacing): use seg_evidence.py")
    prepare_dataset(work / "train_data", work / "cache", prepare_config_for(cfg, segmented_only=True), progress=False)
    cached = segmentation_data(cfg)
    train_uids, val_uids = split_studies(sorted(cached), cfg.fold, cfg.train.n_folds, cfg.train.fold_seed)
    train_paths, val_paths = [cached[u] for u in train_uids], [cached[u] for u in val_uids]

    localiser_file = work / "localiser.pt"
    if not localiser_file.is_file():
        loc_cfg = localiser_config(cfg)
        loc_cfg.train.epochs = args.loc_epochs
        seed_everything(cfg.seed)
        loc_dir = prepare_run_dir(work / "localiser", loc_cfg, False)
        task = SegmentationTask(loc_cfg, train_paths, val_paths, device, progress=False, source="localiser")
        before = seg_evidence.cpu_seconds()
        fit(task, loc_cfg, loc_dir, device=device, progress=False)
        print(f"localiser: {cpu_minutes(before):.2f} CPU minutes", flush=True)
        load_checkpoint(loc_dir / "best.pt", model=task.model, map_location=device)
        torch.save(localiser_checkpoint_entry(loc_cfg, task.model), localiser_file)
    localiser = torch.load(localiser_file, weights_only=False)

    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg.fold_dir(), cfg, False)
    task = SegmentationTask(cfg, train_paths, val_paths, device, progress=False, source="fine",
                            extra={CHECKPOINT_KEY: localiser, "train_uids": train_uids, "val_uids": val_uids})
    before, started = seg_evidence.cpu_seconds(), time.monotonic()
    fit(task, cfg, run_dir, device=device, progress=False)
    fine_cpu, fine_wall = cpu_minutes(before), (time.monotonic() - started) / 60
    summary = pd.read_csv(run_dir / "summary.csv")
    table = seg_evidence.score_heldout(run_dir / "best.pt", work / "heldout_data", 2)
    table.to_csv(out / "heldout_scores.csv", index=False)
    best = summary.loc[summary["val_dice_mean"].idxmax()]
    report = {
        "config": args.config, "overrides": args.overrides, "epochs": args.epochs,
        "fine_cpu_minutes": round(fine_cpu, 2), "fine_wall_minutes": round(fine_wall, 2),
        "best_epoch": int(best["epoch"]), "best_val_dice_grid": round(float(best["val_dice_mean"]), 4),
        **seg_evidence.summarise(table, 2), "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

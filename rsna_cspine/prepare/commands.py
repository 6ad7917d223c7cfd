"""``rsna-cspine prepare``: decode each study once and write everything training needs (and ``--merge``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="Kaggle-layout folder (train.csv, train_images/, segmentations/)")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (shards of one job may share it)")
    parser.add_argument("--seg-models", type=Path, default=None,
                        help="stage-1 models for the masks: a checkpoint, a models folder (seg/**/best.pt) or a "
                             "runs folder; without it, studies with a segmentation are cropped from it")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--shard", default=None, help="i/N: prepare studies k with k %% N == i (N machines)")
    parser.add_argument("--workers", type=int, default=None, help="studies at once (default: fit the machine)")
    parser.add_argument("--cpus", type=int, default=None, help="CPU budget in all (default: the usable cores)")
    parser.add_argument("--studies", nargs="+", default=None, metavar="UID", help="only these studies")
    parser.add_argument("--config", type=Path, default=None, help="YAML of prepare settings")
    parser.add_argument("--seg-config", type=Path, default=None,
                        help="stage-1 training config: the stage-1 input takes its data.grid, hu_window, antialias")
    parser.add_argument("--cls-config", type=Path, default=None,
                        help="stage-2 training config: the crops take its data.crop")
    parser.add_argument("--segmented-only", action="store_true", default=None,
                        help="only the studies with a segmentation (what stage 1 trains on)")
    parser.add_argument("--device", default=None, help="where the stage-1 models run (auto, cpu, cuda[:k])")
    parser.add_argument("--restart", action="store_true", help="forget what the folder holds and start afresh")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="CACHE",
                        help="join these prepared caches (e.g. one per shard) into --out instead of preparing")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings, e.g. crop.size=224 stage1.grid=[128,128,128] mask_source=gt")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.training.prepared import merge_caches
    from rsna_cspine.prepare.config import PrepareConfig, training_config_overrides
    from rsna_cspine.prepare.run import prepare_dataset
    from rsna_cspine.runner import parse_shard

    if args.merge:
        manifest = merge_caches(args.merge, args.out)
        failed = int((manifest["status"] == "failed").sum())
        print(f"{len(manifest) - failed} studies prepared, {failed} failed, in {args.out}")
        return 0
    if args.data is None:
        raise SystemExit("rsna-cspine prepare: --data is required (unless --merge)")
    # Precedence: defaults ← --config ← the training configs' sections ← key=value ← the flags.
    overrides = [*training_config_overrides(args.seg_config, args.cls_config), *args.overrides]
    values = {"workers": args.workers, "cpus": args.cpus, "segmented_only": args.segmented_only, "device": args.device}
    cfg = load_config(PrepareConfig, args.config, overrides, values=values)
    summary = prepare_dataset(args.data, args.out, cfg, seg_models=args.seg_models, split=args.split,
                              shard=parse_shard(args.shard) if args.shard else None, studies=args.studies,
                              restart=args.restart, progress=not args.no_progress)
    print(summary.line())
    for uid, reason in summary.failed.items():
        print(f"failed: {uid}: {reason}")
    return 1 if summary.failed else 0

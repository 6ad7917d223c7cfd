"""``rsna-cspine train-seg``: train the stage-1 vertebra segmenter on one fold."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsna_cspine.config import load_config
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.train import train_segmentation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML config (e.g. configs/seg.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="validation fold; -1 trains on every study")
    parser.add_argument("--resume", action="store_true", help="continue from run_dir/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"fold={args.fold}"] if args.fold is not None else [])
    cfg = load_config(SegConfig, args.config, overrides)
    run_dir = train_segmentation(cfg, resume=args.resume, progress=not args.no_progress)
    print(run_dir)
    return 0

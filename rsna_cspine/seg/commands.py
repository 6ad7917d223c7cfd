"""``rsna-cspine train-seg``: train the stage-1 vertebra segmenter on one fold."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML config (e.g. configs/seg.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="validation fold; -1 trains on every study")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prepared cache to train from (rsna-cspine prepare; sets data.cache_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.seg.config import SegConfig
    from rsna_cspine.seg.train import train_segmentation

    cfg = load_config(SegConfig, args.config, args.overrides, values={"fold": args.fold, "data.cache_dir": args.cache})
    print(train_segmentation(cfg, resume=args.resume, progress=not args.no_progress))
    return 0

"""``rsna-cspine train-cls``: train the stage-2 fracture classifier on one fold."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/cls_cpu.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="validation fold; -1 trains on every study")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prepared cache to train from (rsna-cspine prepare; sets data.cache_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 model.backbone=resnet18")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.train import train_classifier

    cfg = load_config(ClsConfig, args.config, args.overrides, values={"fold": args.fold, "data.cache_dir": args.cache})
    print(train_classifier(cfg, resume=args.resume, progress=not args.no_progress))
    return 0

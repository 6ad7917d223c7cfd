"""``rsna-cspine train-cls``: train the stage-2 fracture classifier on one fold."""

from __future__ import annotations

import argparse

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/cls_cpu.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="validation fold; -1 trains on every study")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=3 model.backbone=resnet18")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.train import train_classifier

    overrides = list(args.overrides) + ([] if args.fold is None else [f"fold={args.fold}"])
    cfg = load_config(ClsConfig, args.config, overrides)
    run_dir = train_classifier(cfg, resume=args.resume)
    print(run_dir)
    return 0

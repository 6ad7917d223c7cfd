"""``rsna-cspine train-2d``: train a 2D image-folder classifier."""

from __future__ import annotations

import argparse

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="folder with one sub-folder per class, or a CSV of path,label")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/twod_cpu.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="k-fold mode: the validation fold (sets split.mode=kfold)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 model.backbone=convnext_tiny data.image_size=224")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.twod.config import TwoDConfig
    from rsna_cspine.twod.train import train_2d

    values: dict = {}
    if args.data is not None:
        values["data"] = {"root": args.data}
    if args.fold is not None:
        values.update(fold=args.fold, split={"mode": "kfold"})
    cfg = load_config(TwoDConfig, args.config, args.overrides, values=values)
    print(train_2d(cfg, resume=args.resume))
    return 0

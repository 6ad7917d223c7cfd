"""``rsna-cspine train-2d-seg``: train the 2D column U-Net on sagittal image / mask pairs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="pairs CSV (path,mask[,study]) or a folder with images/ and masks/")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/seeds/thesis_unet.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 data.image_size=96")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.config import load_config
    from rsna_cspine.twod.seg_config import TwoDSegConfig
    from rsna_cspine.twod.seg_train import train_2d_seg

    values = {"data": {"root": args.data}} if args.data is not None else {}
    cfg = load_config(TwoDSegConfig, args.config, args.overrides, values=values)
    print(train_2d_seg(cfg, resume=args.resume))
    return 0

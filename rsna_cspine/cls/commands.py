"""``rsna-cspine train-cls``: train the stage-2 fracture classifier on one fold."""

from __future__ import annotations

import argparse

from rsna_cspine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/cls_cpu.yaml)")
    parser.add_argument("--fold", type=int, default=None, help="validation fold; -1 trains on every study")
    parser.add_argument("--resume", action="store_true", help="continue from the fold's last.pt")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only build the crop cache (one process; do this before torchrun)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 model.backbone=resnet18")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.train import prepare_classifier_data, train_classifier

    cfg = load_config(ClsConfig, args.config, args.overrides, values={} if args.fold is None else {"fold": args.fold})
    if args.prepare_only:
        index = prepare_classifier_data(cfg)
        print(f"{int((index['status'] != 'failed').sum())} of {len(index)} studies have crops in {cfg.data.cache_dir}")
        return 0
    print(train_classifier(cfg, resume=args.resume, progress=not args.no_progress))
    return 0

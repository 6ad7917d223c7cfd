"""``rsna-cspine predict-seg``: vertebra masks and the per-vertebra table for the studies of a split."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.errors import CSpineError
from rsna_cspine.runner import parse_shard
from rsna_cspine.seg.batch import predict_studies

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout folder")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="best.pt file(s); several = ensemble")
    parser.add_argument("--out", type=Path, required=True, help="output folder (<uid>_mask.npz, vertebrae.csv)")
    parser.add_argument("--studies", nargs="+", default=None, metavar="UID", help="only these studies")
    parser.add_argument("--shard", default=None, metavar="I/N", help="only studies k with k %% N == I (several machines)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:k]")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    try:
        shard = parse_shard(args.shard) if args.shard else None
        table = predict_studies(
            args.data, args.split, args.checkpoint, args.out, studies=args.studies, device=args.device,
            progress=not args.no_progress, shard=shard,
        )
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    failures = args.out / "predict_failures.csv"
    print(f"{table['StudyInstanceUID'].nunique()} studies in {args.out / 'vertebrae.csv'}")
    if failures.is_file():
        print(f"failures listed in {failures}")
        return 1
    return 0

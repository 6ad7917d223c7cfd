"""``rsna-cspine merge``: join the shard files of ``predict --shard i/n`` into one submission."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.errors import CSpineError
from rsna_cspine.inference import merge_shards

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``merge`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("shards", type=Path, nargs="+", help="every shard file of one run")
    parser.add_argument("--test-csv", type=Path, required=True, help="the test.csv the shards were cut from")
    parser.add_argument("--out", type=Path, required=True, help="merged submission.csv")


def run(args: argparse.Namespace) -> int:
    """Merge, refusing a missing or duplicated shard or study.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 on success, 1 when the shards do not form one complete submission (the reason is logged).
    """
    try:
        merged = merge_shards(args.shards, args.test_csv, args.out)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    print(f"submission: {args.out} ({len(merged)} rows from {len(args.shards)} shards)")
    return 0

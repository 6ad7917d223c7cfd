"""``rsna-cspine import-labels --format verse|totalsegmentator|ctspine1k SRC OUT``: stage-1 training data."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.errors import CSpineError
from rsna_cspine.importers.tables import FORMATS, TS_VERSIONS

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``import-labels`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--format", choices=FORMATS, required=True, help="the data set SRC comes from")
    parser.add_argument("src", type=Path, help="the data set's folder, or a CSV of image,labels[,case] pairs")
    parser.add_argument("out", type=Path, help="RSNA-layout folder to write (train_images/, segmentations/, train.csv)")
    parser.add_argument("--ts-version", choices=TS_VERSIONS, default="v2",
                        help="TotalSegmentator multi-label map version (default v2; per-structure masks need none)")
    parser.add_argument("--no-resume", action="store_true", help="redo cases an earlier run finished")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Import the data set and print the counts.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 when the import ran (cases may be skipped or failed: see the report), 1 when SRC is unusable.
    """
    from rsna_cspine.importers.run import import_labels

    try:
        report = import_labels(args.format, args.src, args.out, ts_version=args.ts_version,
                               resume=not args.no_resume, progress=not args.no_progress)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    counts = report["status"].value_counts().to_dict()
    print(f"{len(report)} cases: {counts}")
    print(f"report: {args.out / 'import_report.csv'}; add {args.out} to train-seg's data.extra")
    return 0

"""``rsna-cspine cv``: score out-of-fold predictions and write the CV report folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rsna_cspine.aggregate import PATIENT_RULES
from rsna_cspine.errors import CSpineError
from rsna_cspine.report.cv import run_cv

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``cv`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--oof", type=Path, required=True, help="folder of oof*.csv files (one per fold), or one CSV")
    parser.add_argument("--labels", type=Path, required=True, help="train.csv")
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability counted as positive (default 0.5)")
    parser.add_argument(
        "--rule", choices=PATIENT_RULES, default="calibrated",
        help="patient_overall rule where the OOF files lack it (calibrated: cross-fitted inside each fold)",
    )
    parser.add_argument("--bins", type=int, default=10, help="reliability-table bins (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run the report and print the competition scores.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 on success, 1 when an input is invalid (the reason is logged).
    """
    try:
        summary = run_cv(args.oof, args.labels, args.out, args.threshold, args.rule, args.bins)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    print(f"{summary['n_studies']} studies scored (of {summary['n_labelled']} labelled)")
    for form, score in summary["scores"].items():
        print(
            f"{form:>6}: model {score['model']:.4f}  prior {score['prior']:.4f}  "
            f"improvement {score['relative_improvement']:+.1%}"
        )
    for name, row in summary["rules"].items():
        print(f"patient_overall {name}: study score {row['score_study']:.4f}")
    print(f"report: {summary['files']['report']}", file=sys.stdout)
    return 0

"""``rsna-cspine explain STUDY_DIR``: per-vertebra overlays, crop montages and Grad-CAM of one study."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import CSpineError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``explain`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("study_dir", type=Path, help="the study's folder of DICOM files")
    parser.add_argument("--models", type=Path, required=True, help="models folder (seg/ and cls/ checkpoints)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: explain/<study folder name>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:k] (default auto)")
    parser.add_argument(
        "--vertebrae", nargs="+", choices=VERTEBRAE, default=list(VERTEBRAE), metavar="V",
        help="vertebrae to draw (default all: C1 ... C7)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the pictures and print the probabilities.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 on success, 1 when the models or the study cannot be read (the reason is logged).
    """
    from rsna_cspine.report.explain import explain_study

    out = args.out or Path("explain") / args.study_dir.name
    try:
        result = explain_study(args.study_dir, args.models, out, device=args.device, vertebrae=args.vertebrae)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    for item in result.vertebrae:
        note = "" if item.found else "  (not found: prior)"
        print(f"{item.vertebra:>15}: {item.probability:.4f}{note}")
        for kind, reason in item.missing.items():
            if item.found:  # a vertebra not found has no crops to draw, as the line above says
                print(f"{'':>17}{kind} picture not drawn: {reason}")
    if result.overview is None:
        print(f"overview not drawn: {result.missing.get('overview', '')}")
    print(f"{'patient_overall':>15}: {result.probabilities['patient_overall']:.4f}")
    print(f"pictures in {result.out_dir}")
    return 0

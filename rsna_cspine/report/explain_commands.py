"""``rsna-cspine explain STUDY``: per-vertebra overlays, crop montages and Grad-CAM of one study (a DICOM folder,
an Enhanced CT file or a NIfTI file), or of every study in a folder of them."""

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
    parser.add_argument("study_dir", type=Path,
                        help="the study (folder of DICOM files, Enhanced CT file, NIfTI file) or a folder of studies")
    parser.add_argument("--models", type=Path, required=True, help="models folder (seg/ and cls/ checkpoints)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: explain/<study name>; a folder of studies: one sub-folder each)")
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
    from rsna_cspine.inference import FracturePipeline, PipelineConfig
    from rsna_cspine.io.study import find_studies
    from rsna_cspine.io.volume import study_name
    from rsna_cspine.report.explain import StudyExplainer

    try:
        studies = find_studies([args.study_dir])
        single = len(studies) == 1 and studies[0].path == args.study_dir
        out = args.out or Path("explain") / study_name(args.study_dir)
        explainer = StudyExplainer(FracturePipeline.from_models_dir(args.models, PipelineConfig(device=args.device)))
        failed = 0
        for study in studies:
            try:
                result = explainer.explain(study.path, out if single else out / study.name, vertebrae=args.vertebrae)
            except CSpineError as exc:  # one bad study of a folder does not stop the others
                logger.error("%s", exc)
                failed += 1
                continue
            print(f"{study.name}:")
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
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    return 1 if failed else 0

"""``rsna-cspine`` console script: one subcommand per job, each a thin wrapper.

Each subcommand lives in the module named below and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. ``run`` only converts arguments into a call of a
plain typed function that a notebook can call too. Modules are imported lazily so that
``rsna-cspine synth`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

#: subcommand → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("rsna_cspine.synth.commands", "write a synthetic Kaggle-layout dataset"),
    "prepare": ("rsna_cspine.prepare.commands", "decode each study once: stage-1 inputs, masks, crops (sharded, resumable)"),
    "train-seg": ("rsna_cspine.seg.commands", "train the stage-1 3D UNet (one fold)"),
    "predict-seg": ("rsna_cspine.seg.predict_commands", "predict vertebra masks for studies"),
    "train-cls": ("rsna_cspine.cls.commands", "train the stage-2 fracture classifier (one fold)"),
    "predict": ("rsna_cspine.predict_commands", "studies → submission.csv or predictions.csv (full pipeline)"),
    "import-labels": ("rsna_cspine.importers.commands", "VerSe / TotalSegmentator / CTSpine1K → stage-1 training data"),
    "merge": ("rsna_cspine.merge_commands", "join sharded prediction outputs into one submission"),
    "cv": ("rsna_cspine.report.commands", "score out-of-fold predictions and write the CV report"),
    "demo": ("rsna_cspine.demo", "synthetic data → train both stages → predict → score"),
    "explain": ("rsna_cspine.report.explain_commands", "overlays and Grad-CAM for one study"),
    "serve": ("rsna_cspine.report.web", "local study viewer web page"),
    "train-2d": ("rsna_cspine.twod.commands", "train a 2D image-folder classifier"),
    "predict-2d": ("rsna_cspine.twod.predict_commands", "class probabilities for one 2D image"),
    "synth-2d": ("rsna_cspine.twod.synth_commands", "write a synthetic 2D image folder (normal/fracture/dislocation)"),
    "synth-sagittal": ("rsna_cspine.twod.sagittal_commands",
                       "sagittal CT images, column masks and fracture grades from phantoms"),
    "import-sagittal": ("rsna_cspine.twod.import_commands", "sagittal images and column masks from a labelled real CT"),
    "train-2d-seg": ("rsna_cspine.twod.seg_commands", "train the 2D column U-Net on sagittal slices and masks"),
}


def _module_file_exists(module_name: str) -> bool:
    """True when the subcommand's module is present, checked on disk so no stage package is imported
    (importing ``rsna_cspine.seg`` would pull in torch and MONAI just to print the help)."""
    package_root = Path(__file__).resolve().parent.parent
    relative = Path(*module_name.split("."))
    return (package_root / relative.with_suffix(".py")).is_file() or (package_root / relative / "__init__.py").is_file()


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsna-cspine", description="RSNA 2022 cervical-spine fracture detection: DICOM studies → submission.csv"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if available_only and not _module_file_exists(module_name):
            continue
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if not argv or argv[0] not in COMMANDS:
        build_parser().print_help()
        return 2
    name = argv.pop(0)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pylibjpeg-openjpeg logs every JPEG 2000 tile at INFO, which buries the progress of real work.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    module = importlib.import_module(COMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"rsna-cspine {name}", description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    # Intermixed: ``key=value`` overrides may stand before, between or after the flags and a positional path.
    return int(module.run(sub_parser.parse_intermixed_args(argv)) or 0)


def main_entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_entry()

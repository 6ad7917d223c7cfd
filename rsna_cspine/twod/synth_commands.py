"""``rsna-cspine synth-2d OUT``: write a synthetic image folder of lateral cervical-spine radiographs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (one sub-folder per class, plus labels.csv)")
    parser.add_argument("--per-class", type=int, default=50, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    parser.add_argument("--classes", default="normal,fracture",
                        help="comma-separated subset of normal,fracture,dislocation")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--noise", type=float, default=0.06, help="Gaussian noise SD (image range 0..1)")
    parser.add_argument("--contrast", type=float, default=0.55, help="brightness of bone above soft tissue")
    parser.add_argument("--severity", type=float, default=1.0, help="scales the size of the fracture and shift signs")
    parser.add_argument("--dicom", type=int, default=0, help="of each class, write this many as DICOM instead of PNG")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.twod.synth import Synth2DConfig, write_image_folder

    cfg = Synth2DConfig(
        per_class=args.per_class, seed=args.seed, classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        size=args.size, noise=args.noise, contrast=args.contrast, severity=args.severity, dicom_per_class=args.dicom,
    )
    table = write_image_folder(args.out, cfg)
    print(f"{len(table)} images of {len(cfg.classes)} classes in {args.out}")
    return 0

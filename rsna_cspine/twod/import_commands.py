"""``rsna-cspine import-sagittal CT LABELS OUT``: sagittal images and column masks from a labelled real CT
(VerSe: CT and mask NIfTI; TotalSegmentator: a DICOM folder and its label NIfTI with ``--labels``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", type=Path, help="DICOM series folder or CT NIfTI (HU)")
    parser.add_argument("labels", type=Path, help="label NIfTI of the same patient")
    parser.add_argument("out", type=Path, help="dataset folder; rows are added to its labels.csv")
    parser.add_argument("--labels", dest="vertebra_labels", default=None,
                        help="label values that are vertebrae, e.g. 26-50 (TotalSegmentator v2); default: every "
                             "label above 0 (VerSe masks hold vertebrae only)")
    parser.add_argument("--study", default=None, help="study name (default: the CT's file or folder name)")
    parser.add_argument("--label", default="", help="the study's class, if known")
    parser.add_argument("--slices", type=int, default=15, help="sagittal planes")
    parser.add_argument("--spacing-mm", type=float, default=2.0, help="distance between planes")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--field-mm", type=float, default=180.0, help="side of the square field around the column")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.twod.sagittal import SagittalConfig
    from rsna_cspine.twod.sagittal_import import import_sagittal, parse_labels

    cfg = SagittalConfig(slices=args.slices, spacing_mm=args.spacing_mm, size=args.size, field_mm=args.field_mm)
    added = import_sagittal(args.ct, args.labels, args.out, cfg, parse_labels(args.vertebra_labels),
                            study=args.study, label=args.label)
    print(f"{len(added)} sagittal images of {added['study'].iloc[0]} added to {args.out / 'labels.csv'}")
    return 0

"""``rsna-cspine synth-sagittal OUT``: sagittal CT images (with column masks and fracture grades) from phantoms.

The settings are :class:`~rsna_cspine.twod.sagittal.SagittalDatasetConfig`, loaded like every config:
``--config FILE`` ← ``key=value`` overrides (``sagittal.slices=15 synth.image_size=256``) ← the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (images/, masks/, labels.csv, studies.csv)")
    parser.add_argument("--config", type=Path, default=None, help="YAML with studies, seed, sagittal: and synth:")
    parser.add_argument("--studies", type=int, default=None, help="number of studies")
    parser.add_argument("--seed", type=int, default=None, help="master seed (same seed, same images)")
    parser.add_argument("--slices", type=int, default=None, help="sagittal planes per study (sagittal.slices)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (sagittal.size)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="e.g. sagittal.spacing_mm=2 sagittal.field_mm=160 synth.image_size=256 "
                             "synth.fracture_size_mm=[4,9]")


def run(args: argparse.Namespace) -> int:
    from rsna_cspine.config import load_config
    from rsna_cspine.twod.sagittal import SagittalDatasetConfig, write_sagittal_dataset

    values = {"studies": args.studies, "seed": args.seed, "sagittal.slices": args.slices, "sagittal.size": args.size}
    cfg = load_config(SagittalDatasetConfig, args.config, args.overrides, values=values)
    table = write_sagittal_dataset(args.out, cfg)
    print(f"{len(table)} sagittal images of {table['study'].nunique()} studies in {args.out}")
    return 0

"""``rsna-cspine predict``: studies of test.csv → submission.csv (or one shard of it), or any studies
(``--inputs``: DICOM folders, Enhanced CT files, NIfTI files, folders of them) → predictions.csv."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.aggregate import PATIENT_RULES
from rsna_cspine.config import load_config
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.inference import PipelineConfig, predict_dataset, predict_inputs, timing_log_path
from rsna_cspine.runner import parse_shard

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``predict`` options.

    Args:
        parser: the subcommand's parser.
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="Kaggle-layout folder (test.csv, test_images/) → submission.csv")
    source.add_argument("--inputs", type=Path, nargs="+", metavar="PATH",
                        help="studies: DICOM folders, Enhanced CT files, NIfTI files (.nii, .nii.gz) or folders of "
                             "them → predictions.csv, one row per study")
    parser.add_argument("--models", type=Path, required=True, help="folder with seg/ and cls/ checkpoints")
    parser.add_argument("--out", type=Path, required=True,
                        help="submission.csv (or the shard file with --shard); with --inputs, predictions.csv")
    parser.add_argument("--config", type=Path, default=None, help="YAML of PipelineConfig settings")
    parser.add_argument("--shard", default=None, metavar="I/N", help="predict only studies k with k %% N == I")
    parser.add_argument("--rule", choices=PATIENT_RULES, default=None, help="patient_overall rule (default calibrated: noisy-OR through the checkpoints' validation fit)")
    parser.add_argument("--blend-weight", type=float, default=None, help="noisy-OR weight of the blend rule")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="wall-clock limit")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda[:k]")
    parser.add_argument("--tta", action="store_true", default=None, help="flip test-time augmentation")
    parser.add_argument("--cpu-bf16", action="store_true", default=None,
                        help="stage 2 in bfloat16 on CPUs with native bf16 (fp32 elsewhere)")
    parser.add_argument("--no-resume", action="store_true", help="ignore results of an earlier interrupted run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="more PipelineConfig settings")


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The typed ``PipelineConfig`` settings given as flags (None: not given, the YAML or default stands).

    Args:
        args: parsed options of ``add_arguments``.
    """
    return {
        "rule": args.rule,
        "blend_weight": args.blend_weight,
        "time_budget_s": args.time_budget,
        "device": args.device,
        "tta": args.tta,
        "cpu_bf16": args.cpu_bf16,
        "resume": False if args.no_resume else None,
    }


def run(args: argparse.Namespace) -> int:
    """Predict and write the submission.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 on success, 1 when an input is invalid (the reason is logged).
    """
    try:
        cfg = load_config(PipelineConfig, args.config, list(args.overrides), flag_values(args))
        if args.inputs:
            if args.shard:
                raise ConfigError("--shard splits a test.csv; with --inputs give each machine its own paths")
            table = predict_inputs(args.inputs, args.models, args.out, cfg=cfg, progress=not args.no_progress)
            print(f"predictions: {args.out} ({len(table)} studies: {table['status'].value_counts().to_dict()})")
            print(f"per-study timings: {timing_log_path(args.out)}")
            return 0
        shard = parse_shard(args.shard) if args.shard else None
        rows = predict_dataset(args.data, args.models, args.out, shard=shard, cfg=cfg, progress=not args.no_progress)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    what = "shard file" if shard else "submission"
    print(f"{what}: {args.out} ({len(rows)} rows)")
    print(f"per-study timings: {timing_log_path(args.out)}")
    return 0

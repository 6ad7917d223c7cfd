"""``rsna-cspine synth OUT``: write a synthetic Kaggle-layout dataset.

Every ``SynthConfig`` knob is a flag (``--noise-hu 10 40``, ``--compressed-fraction 0.5``, …), with the
short aliases ``--studies``, ``--slices``, ``--noise``, ``--fracture-size`` and ``--fracture-contrast``.
Precedence: built-in defaults < ``--config synth.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import logging
import types
import typing
from pathlib import Path

from rsna_cspine.synth.config import config_field_types, load_config
from rsna_cspine.synth.dataset import write_dataset

log = logging.getLogger(__name__)

#: Short flag names kept for the common knobs.
ALIASES: dict[str, str] = {
    "n_studies": "--studies",
    "n_slices": "--slices",
    "noise_hu": "--noise",
    "fracture_size_mm": "--fracture-size",
    "fracture_contrast_hu": "--fracture-contrast",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the output folder, ``--config``, ``--overwrite`` and one flag per config knob.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("out", type=Path, help="dataset root to write (Kaggle layout)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of knob values")
    parser.add_argument("--overwrite", action="store_true", help="replace images from an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for name, kind in config_field_types().items():
        flags = [f"--{name.replace('_', '-')}"]
        if name in ALIASES:
            flags.insert(0, ALIASES[name])
        options: dict = {"dest": name, "default": None}
        base, element = _unwrap(kind)
        if base is tuple:
            options.update(nargs=2, type=element, metavar=("LOW", "HIGH"))
        elif base is bool:
            options.update(type=_parse_bool, metavar="BOOL")
        else:
            options.update(type=base)
        parser.add_argument(*flags, help=f"SynthConfig.{name}", **options)


def _unwrap(kind: object) -> tuple[type, type | None]:
    """``tuple[float, float] | None`` → ``(tuple, float)``; ``int`` → ``(int, None)``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = args[0]
        args = list(typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return tuple, args[0]
    return kind, None  # type: ignore[return-value]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def run(args: argparse.Namespace) -> int:
    """Build the config from ``args`` and write the dataset.

    Args:
        args: parsed arguments of ``add_arguments``.

    Returns:
        Process exit code (0).
    """
    overrides = {name: getattr(args, name) for name in config_field_types()}
    cfg = load_config(args.config, **overrides)
    table = write_dataset(args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite)
    n_test = int((table["split"] == "test").sum()) if len(table) else 0
    log.info("wrote %d studies (%d train, %d test) to %s", len(table), len(table) - n_test, n_test, args.out)
    return 0

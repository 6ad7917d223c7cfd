"""``rsna-cspine synth OUT``: write a synthetic Kaggle-layout dataset.

Every ``SynthConfig`` knob is set the way every other command sets its config: ``--config synth.yaml``
and ``key=value`` overrides (``noise_hu=[10,40] compressed_fraction=0.5``), with ``--studies`` and
``--seed`` for the two everyone sets. Precedence: built-in defaults < ``--config`` < overrides < the two flags.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rsna_cspine.synth.config import load_config
from rsna_cspine.synth.dataset import write_dataset

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the output folder, ``--config``, ``--studies``, ``--seed``, ``--overwrite`` and the overrides.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("out", type=Path, help="dataset root to write (Kaggle layout)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of knob values (e.g. configs/synth.yaml)")
    parser.add_argument("--studies", type=int, default=None, help="number of studies (SynthConfig.n_studies)")
    parser.add_argument("--seed", type=int, default=None, help="master seed (SynthConfig.seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace images from an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="SynthConfig knobs, e.g. image_size=128 noise_hu=[10,40] prevalence_scale=2")


def run(args: argparse.Namespace) -> int:
    """Build the config from ``args`` and write the dataset.

    Args:
        args: parsed arguments of ``add_arguments``.

    Returns:
        Process exit code (0).
    """
    cfg = load_config(args.config, args.overrides, n_studies=args.studies, seed=args.seed)
    table = write_dataset(args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite)
    n_test = int((table["split"] == "test").sum()) if len(table) else 0
    log.info("wrote %d studies (%d train, %d test) to %s", len(table), len(table) - n_test, n_test, args.out)
    return 0

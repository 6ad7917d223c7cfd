"""Score finished stage-2 evidence runs on one more synthetic held-out set, made with other generator settings.

``cls_evidence.py`` trains and scores on data from the same generator knobs. This script writes (or
reuses) a further held-out set from a new seed and any knobs (none given = the generator's defaults,
smaller and fainter fractures than the evidence command's), then scores each run's ``best.pt`` on it
against the prior of the training set the runs were trained on. Nothing is trained here.

Run (from the repository root):
    .venv/bin/python benchmarks/cls_crosscheck.py --work work/cls_xeval --seed 2024 \
        --train-labels work/cls_ev7/train_data/train.csv --runs work/cls_ev11 work/cls_ev15 work/cls_ev16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from rsna_cspine.io.kaggle import read_train_labels
from rsna_cspine.metric import prior_predictions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cls_evidence import evaluate, make_synthetic  # noqa: E402  (a sibling script, not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the extra held-out set, its crops and xeval.json go here")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--prevalence-scale", type=float, default=2.5)
    parser.add_argument("--synth", nargs="*", default=[], metavar="KNOB=VALUE", help="generator knobs (default: none)")
    parser.add_argument("--train-labels", type=Path, required=True, help="train.csv of the runs' training set (for the prior)")
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="cls_evidence --work folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    knobs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.synth)}
    root = make_synthetic(args.work / "data", args.studies, args.seed, args.prevalence_scale, knobs)
    prior = prior_predictions(read_train_labels(args.train_labels))
    results = {}
    for run in args.runs:
        r = evaluate(run / "run" / "fold0" / "best.pt", root, args.work / "crops", prior, tta=False)
        results[str(run)] = {key: r[key] for key in ("auc_pooled", "auc_per_vertebra", "score", "prior_score",
                                                     "relative_improvement", "heldout_fractured_share")}
        per = {k: None if v is None else round(v, 3) for k, v in r["auc_per_vertebra"].items()}
        print(f"{run}: pooled AUC {r['auc_pooled']:.4f} {per}; score {r['score']:.4f} vs prior "
              f"{r['prior_score']:.4f} ({100 * r['relative_improvement']:.1f}% below)")
    out = {"seed": args.seed, "studies": args.studies, "prevalence_scale": args.prevalence_scale, "synth": knobs,
           "train_labels": str(args.train_labels), "results": results}
    (args.work / "xeval.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

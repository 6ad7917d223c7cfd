"""Score another stage-2 run on a finished demo's held-out test studies, with the demo's own stage 1.

The demo's stage 2 is what most needs trying out, and a whole demo run costs its ten minutes. This script
takes a stage-2 run trained elsewhere (``rsna-cspine train-cls`` on the demo's data, e.g. from a cache
prepared with other crop settings), pairs its ``fold0/best.pt`` with the demo's stage-1 model, predicts the
demo's test studies through the whole pipeline (stage-1 masks → crops → stage 2, as ``predict`` does) and
scores them as the demo does (``report.heldout.score_heldout``). It prints one JSON line plus the mean
vertebra probability and the per-vertebra AUC.

Run (from the repository root, after ``rsna-cspine demo --out demo``):
    .venv/bin/rsna-cspine prepare --data demo/data --out work/cache_b --seg-config demo/runs/seg/fold0/config.yaml \\
        --cls-config demo/runs/cls/fold0/config.yaml crop.add_mask_channel=false
    .venv/bin/rsna-cspine train-cls --config demo/runs/cls/fold0/config.yaml --cache work/cache_b \\
        run_dir=work/cls_b train.max_minutes=200 train.epochs=27 data.crop.add_mask_channel=false
    .venv/bin/python benchmarks/demo_rescore.py --demo demo --run work/cls_b
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, type=Path, help="a finished demo folder (data/, models/seg/)")
    parser.add_argument("--run", required=True, type=Path, help="a stage-2 run folder (fold0/best.pt, fold0/config.yaml)")
    parser.add_argument("--rule", default="noisy_or", help="patient_overall rule (the demo's default)")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from rsna_cspine.io.kaggle import read_train_labels
    from rsna_cspine.metric import prior_predictions
    from rsna_cspine.pipeline import PipelineConfig, predict_dataset
    from rsna_cspine.report.heldout import score_heldout, vertebra_table

    data, models = args.demo / "data", args.run / "rescore_models"
    for stage, source in (("seg", args.demo / "models" / "seg" / "fold0"), ("cls", args.run / "fold0")):
        target = models / stage / "fold0"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "config.yaml"):
            shutil.copy2(source / name, target / name)
    submission = predict_dataset(data, models, args.run / "rescore_submission.csv",
                                 cfg=PipelineConfig(device="cpu", rule=args.rule, resume=False))
    labels = read_train_labels(data / "test_labels.csv")
    scores = score_heldout(submission, labels, prior_predictions(read_train_labels(data / "train.csv")))
    table = vertebra_table(submission, labels)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.to_dict().items()}))
    per_vertebra = {v: round(float(roc_auc_score(g["label"], g["probability"])), 2)
                    for v, g in table.groupby("vertebra") if 0 < g["label"].sum() < len(g)}
    print(f"mean vertebra probability {table['probability'].mean():.3f}; per-vertebra AUC {per_vertebra}")


if __name__ == "__main__":
    main()

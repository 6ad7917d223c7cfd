"""Try stage-2 models on fixed stage-1 crops: a demo's test studies and its cross-check sets, cut once.

A demo run costs ten minutes and its cross-check five more, and most of both is stage 1 and the data. To
compare stage-2 variants (training settings, calibration, test-time flips) this script runs a finished
demo's stage 1 once over each set's test studies and stores the crops it cuts (``crops``); every stage-2
run is then scored on exactly those crops in seconds (``score``), the way ``predict`` scores them: a
vertebra stage 1 did not find, or its quality check dropped, takes the prior that ``predict`` would give it
(the set's own ``train.csv`` prevalence, else the models'); patient_overall by noisy-OR (the demo's rule);
the score against the prior of the demo's training studies (``report.heldout.score_heldout``).

Run (from the repository root, after ``rsna-cspine demo --out DEMO`` and ``benchmarks/demo_crosscheck.py``):
    .venv/bin/python benchmarks/stage2_sets.py crops --demo DEMO --data DEMO/data work/xcheck/seed101/data \\
        --out work/s2sets
    .venv/bin/python benchmarks/stage2_sets.py score --demo DEMO --sets work/s2sets --run DEMO/runs/cls [--tta] \\
        [--calibration pooled|per-vertebra --cache DEMO/work/prepared_*]

``--run`` is a stage-2 run folder (``fold0/best.pt``; ``oof_fold0.csv`` beside it for a refitted calibration),
e.g. a demo's ``runs/cls`` or a ``rsna-cspine train-cls`` run on the demo's cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def cut_crops(demo: Path, data_dirs: list[Path], out: Path) -> None:
    """Stage 1 of ``demo`` over every test study of each data folder; crops to ``out/<set>/<uid>.npz``."""
    from tqdm import tqdm

    from rsna_cspine.inference import FracturePipeline, PipelineConfig

    pipe = FracturePipeline.from_models_dir(demo / "models", PipelineConfig(device="cpu"))
    for data in data_dirs:
        name = data.parent.name if data.name == "data" else data.name
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        (target / "data").write_text(str(data.resolve()))
        for folder in tqdm(sorted((data / "test_images").iterdir()), desc=name):
            path = target / f"{folder.name}.npz"
            if path.exists():
                continue
            volume = pipe.load(folder)
            crops = pipe.crop(volume, pipe.segment(volume))
            np.savez(path, images=crops.images, present=crops.present)


def refit_calibration(ensemble, run: Path, cache: Path, train_csv: Path, per_vertebra: bool) -> None:
    """Refit each model's vertebra calibration on its validation studies (the run's ``oof_fold*.csv``),
    from their true-mask crops in ``cache``: the same model under a pooled or a per-vertebra fit."""
    import pandas as pd

    from rsna_cspine.calibration import fit_vertebra_calibration
    from rsna_cspine.constants import VERTEBRAE
    from rsna_cspine.crops import load_crops

    oof_files = sorted(run.rglob("oof_fold*.csv"))
    if len(ensemble.models) != 1 or len(oof_files) != 1:
        raise SystemExit(f"a refitted calibration needs one fold: {len(ensemble.models)} models, {len(oof_files)} OOF files in {run}")
    truth = pd.read_csv(train_csv).set_index("StudyInstanceUID")
    studies = pd.read_csv(oof_files[0])["StudyInstanceUID"]
    fits = []
    for model in ensemble.models:
        single = type(ensemble)([model], ensemble.crop_config, ensemble.device, amp=False)
        probs, labels, levels = [], [], []
        for uid in studies:
            crops = load_crops(cache / "crops" / f"{uid}.npz")
            present = np.flatnonzero(crops.present)
            probs.append(single.predict_stacks(crops.images[present], vertebrae=present))
            labels.append(truth.loc[uid, [VERTEBRAE[i] for i in present]].to_numpy(float))
            levels.append(present)
        p, y, v = np.concatenate(probs), np.concatenate(labels), np.concatenate(levels)
        fits.append(fit_vertebra_calibration(p, y, v if per_vertebra else None))
    ensemble.vertebra_calibrations = fits


def score_sets(demo: Path, sets: list[Path], run: Path, tta: bool, calibration: str = "stored",
               cache: Path | None = None) -> dict[str, dict[str, float]]:
    """Score the stage-2 checkpoints under ``run`` on each crop set; one dict of figures per set.

    ``calibration``: ``stored`` (the checkpoints' own vertebra fits), ``none``, or ``pooled`` /
    ``per-vertebra`` refitted on the run's validation studies from the demo's crop ``cache``.
    """
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    from rsna_cspine.aggregate import study_probabilities
    from rsna_cspine.cls.predict import load_classifiers
    from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
    from rsna_cspine.inference import PipelineConfig
    from rsna_cspine.inference.dataset import dataset_prior
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
    from rsna_cspine.metric import prior_predictions
    from rsna_cspine.report.heldout import score_heldout, vertebra_table

    ensemble = load_classifiers(sorted(run.rglob("best.pt")), torch.device("cpu"))
    if calibration == "none":
        ensemble.vertebra_calibrations = [None] * len(ensemble.models)
    elif calibration != "stored":
        if cache is None:
            raise SystemExit("--calibration pooled|per-vertebra needs --cache (the crop cache the run trained on)")
        import yaml

        trained_on = Path(yaml.safe_load(next(run.rglob("config.yaml")).read_text())["data"]["root"])
        refit_calibration(ensemble, run, cache, trained_on / "train.csv", calibration == "per-vertebra")
    prior = prior_predictions(read_train_labels(demo / "data" / "train.csv"))
    results: dict[str, dict[str, float]] = {}
    for crop_dir in sets:
        for set_dir in sorted(p for p in [crop_dir, *crop_dir.iterdir()] if (p / "data").is_file()):
            data = Path((set_dir / "data").read_text())
            labels = read_train_labels(data / "test_labels.csv")
            # The fallback predict uses: the set's own train.csv prevalence when it has labelled studies (a demo's
            # test split), else the models' training prevalence (cross-check sets).
            fallback = dataset_prior(KaggleLayout(data), PipelineConfig())
            fallback = ensemble.prevalence if fallback is None else fallback
            rows = []
            for uid in labels["StudyInstanceUID"]:
                stored = np.load(set_dir / f"{uid}.npz")
                present = stored["present"]
                probs = np.full(len(VERTEBRAE), np.nan)
                if present.any():
                    probs[present] = ensemble.predict_stacks(stored["images"][present], tta=tta,
                                                             vertebrae=np.flatnonzero(present))
                row = study_probabilities(probs, fallback, rule="noisy_or")  # as predict does, the demo's rule
                rows += [(f"{uid}_{c}", p) for c, p in zip(TARGET_COLUMNS, row)]
            submission = pd.DataFrame(rows, columns=["row_id", "fractured"])
            scores = score_heldout(submission, labels, prior).to_dict()
            table = vertebra_table(submission, labels)
            per = {v: round(float(roc_auc_score(g["label"], g["probability"])), 2) for v, g in table.groupby("vertebra")
                   if 0 < g["label"].sum() < len(g)}
            results[set_dir.name] = {"auc": round(scores["auc"], 4), "below_prior": round(scores["below_prior"], 4),
                                     "sensitivity": round(scores["sensitivity"], 3),
                                     "specificity": round(scores["specificity"], 3), "per_vertebra": per}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    crops = sub.add_parser("crops", help="run the demo's stage 1 once and store the crops of each set")
    crops.add_argument("--demo", required=True, type=Path)
    crops.add_argument("--data", required=True, nargs="+", type=Path, help="folders with test_images/ and test_labels.csv")
    crops.add_argument("--out", required=True, type=Path)
    score = sub.add_parser("score", help="score stage-2 checkpoints on stored crops")
    score.add_argument("--demo", required=True, type=Path, help="the demo whose training studies give the prior")
    score.add_argument("--sets", required=True, nargs="+", type=Path)
    score.add_argument("--run", required=True, type=Path, help="folder holding stage-2 best.pt files")
    score.add_argument("--tta", action="store_true", help="average over a left-right flip")
    score.add_argument("--calibration", default="stored", choices=("stored", "none", "pooled", "per-vertebra"))
    score.add_argument("--cache", type=Path, help="the demo's crop cache (for a refitted calibration)")
    args = parser.parse_args()
    if args.command == "crops":
        cut_crops(args.demo, args.data, args.out)
    else:
        print(json.dumps(score_sets(args.demo, args.sets, args.run, args.tta, args.calibration, args.cache)))


if __name__ == "__main__":
    main()

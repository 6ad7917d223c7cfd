"""Accuracy of the five systems this project grew from, each run with its seed config (configs/seeds) on
synthetic stand-ins for its data, on the CPU with a short time budget per run.

Not a timing: the figures are test accuracies (and the column U-Net's validation Dice), each with the
majority-class share of its test split beside it. Every command is printed as it was run (``rsna-cspine
...``); the overrides say what differs from the config (CPU, no ImageNet file, smaller images, the budget).
Data and runs go under ``--work``; a system whose report exists is not trained again (``--force`` retrains)::

    .venv/bin/python benchmarks/seed_systems.py                    # 60 studies, 300 radiographs per class
    .venv/bin/python benchmarks/seed_systems.py --quick            # 24 studies, 40 per class, 1-minute runs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

import common

SEEDS = Path("configs") / "seeds"  # commands run from the repository root and are shown with relative paths
THESIS = ("resnet26", "resnetrs50", "inception_resnet_v2", "swin_s3_tiny", "convnext_tiny")
RADIOGRAPH = ("cad_alexnet", "cad_googlenet", "efficientnet_bone", "mobilenet_spine")


def run(args: list[str]) -> tuple[str, float]:
    """Run ``rsna-cspine ARGS`` in a fresh process; returns the command as a user types it and the minutes."""
    shown = "rsna-cspine " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rsna_cspine.cli", *args], check=True, cwd=common.REPO_ROOT)
    return shown, (time.perf_counter() - start) / 60


def majority(report: Path, name: str) -> float:
    """Share of the most common true label in a report's predictions (what always guessing it scores)."""
    return float(pd.read_csv(report / f"{name}_predictions.csv")["label"].value_counts(normalize=True).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK / "seeds")
    parser.add_argument("--studies", type=int, default=60, help="sagittal phantom studies")
    parser.add_argument("--per-class", type=int, default=300, help="synthetic radiographs per class")
    parser.add_argument("--size", type=int, default=96, help="classifier image side (the configs use 224-299)")
    parser.add_argument("--minutes", type=float, default=5.0, help="budget of each training run (train.max_minutes)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--systems", nargs="*", default=None, help="subset, e.g. thesis_resnet26 cad_alexnet")
    parser.add_argument("--force", action="store_true", help="retrain systems that already have a report")
    parser.add_argument("--quick", action="store_true", help="24 studies, 40 per class, 1-minute runs")
    args = parser.parse_args(argv)
    os.chdir(common.REPO_ROOT)
    if args.quick:
        args.studies, args.per_class, args.minutes = 24, 40, 1.0
    work = args.work.resolve()
    if work.is_relative_to(common.REPO_ROOT):
        work = work.relative_to(common.REPO_ROOT)
    cpu = ["device=cpu", "train.amp=false", "train.num_workers=0", f"train.threads={args.threads}",
           f"train.max_minutes={args.minutes:g}"]
    info = common.machine_info(args.threads)
    rows, data = [], {}

    sagittal, xr = work / "sagittal", work / "xr"
    if not (sagittal / "labels.csv").is_file():
        run(["synth-sagittal", str(sagittal), "--studies", str(args.studies), "--seed", "0"])
    if not (xr / "labels.csv").is_file():
        run(["synth-2d", str(xr), "--per-class", str(args.per_class), "--seed", "0", "--size", "128",
             "--classes", "normal,fracture,dislocation"])
        table = pd.read_csv(xr / "labels.csv")
        table[table["label"] != "dislocation"].to_csv(xr / "binary.csv", index=False)
    wanted = set(args.systems) if args.systems else None

    unet = work / "runs" / "thesis_unet"
    if not (unet / "best.pt").is_file() or (args.force and (wanted is None or "thesis_unet" in wanted)):
        shutil.rmtree(unet, ignore_errors=True)
        command, minutes = run(["train-2d-seg", "--config", str(SEEDS / "thesis_unet.yaml"), "--data",
                                str(sagittal / "labels.csv"), f"run_dir={unet}", *cpu])
        data["thesis_unet"] = {"command": command, "minutes": minutes}
    summary = pd.read_csv(unet / "summary.csv")
    rows.append(["thesis_unet", "column U-Net, best val Dice", common.fmt(summary["val_dice"].max(), 3), "—",
                 len(summary)])

    jobs = [(f"thesis_{b}", sagittal / "labels.csv", [f"data.mask_with={unet / 'best.pt'}"]) for b in THESIS]
    jobs += [(name, xr if name.startswith("cad") else xr / "binary.csv", ["data.in_memory=true"]) for name in RADIOGRAPH]
    for name, source, extra in jobs:
        if wanted is not None and name not in wanted:
            continue
        out = work / "runs" / name
        if args.force or not (out / "report" / "test_metrics.csv").is_file():
            if args.force and out.exists():
                shutil.rmtree(out)
            size = max(args.size, 96) if "inception" in name else args.size
            command, minutes = run(["train-2d", "--config", str(SEEDS / f"{name}.yaml"), "--data", str(source),
                                    f"run_dir={out}", "model.pretrained_file=null", f"data.image_size={size}",
                                    *extra, *cpu])
            data[name] = {"command": command, "minutes": minutes}
        report = out / "report"
        epochs = len(pd.read_csv(out / "summary.csv"))
        if name.startswith("thesis"):
            study = pd.read_csv(report / "test_study_binary_metrics.csv").iloc[0]
            image = pd.read_csv(report / "test_binary_metrics.csv").iloc[0]
            graded = pd.read_csv(report / "test_metrics.csv").iloc[0]
            rows.append([name, "test accuracy, present vs absent: studies (middle 5) / images; 4 grades (images)",
                         f"{study['accuracy']:.3f} / {image['accuracy']:.3f}; {graded['accuracy']:.3f}",
                         f"{majority(report, 'test_study_binary'):.3f} / {majority(report, 'test_binary'):.3f}; "
                         f"{majority(report, 'test'):.3f}", epochs])
            data.setdefault(name, {}).update(study_binary_accuracy=float(study["accuracy"]),
                                             image_binary_accuracy=float(image["accuracy"]),
                                             grade_accuracy=float(graded["accuracy"]))
        else:
            metrics = pd.read_csv(report / "test_metrics.csv").iloc[0]
            rows.append([name, f"test accuracy ({'3 classes' if name.startswith('cad') else 'binary'}); ROC AUC",
                         f"{metrics['accuracy']:.3f}; {metrics['roc_auc']:.3f}", f"{majority(report, 'test'):.3f}", epochs])
            data.setdefault(name, {}).update(accuracy=float(metrics["accuracy"]), roc_auc=float(metrics["roc_auc"]))

    table = common.markdown_table(["system", "figure", "measured", "majority class", "epochs run"], rows)
    commands = "\n".join(f"- `{name}`: `{entry['command']}` ({entry['minutes']:.1f} min)"
                         for name, entry in data.items() if "command" in entry)
    markdown = f"{table}\n\nCommands of this invocation:\n\n{commands or '- (all reports existed; nothing retrained)'}\n"
    print(markdown)
    common.save_results("seed_systems", info, common.command_line(), markdown, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

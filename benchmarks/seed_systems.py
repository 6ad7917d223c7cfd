"""Accuracy of the five systems this project grew from, each run with its seed config (configs/seeds) on
synthetic stand-ins for its data, on the CPU, for a fixed number of epochs per system.

Not a timing: the figures are test accuracies (and the column U-Net's validation Dice), each with the
majority-class share of its test split beside it. Each system trains for the epochs in :data:`EPOCHS`
(``--epochs`` sets one count for all), so its figure is the same on a quiet or a loaded machine; the wall
time of each run is reported beside it as a secondary, load-dependent column. Every command is printed as it
was run (``rsna-cspine ...``); the overrides say what differs from the config (CPU, smaller images, the
epochs). The seed configs train from random weights (no ImageNet file is on this machine) with their
from-scratch recipes. Data and runs go under ``--work``; a system whose report exists is not trained again
(``--force`` retrains)::

    .venv/bin/python benchmarks/seed_systems.py                    # 200 studies, 300 radiographs per class
    .venv/bin/python benchmarks/seed_systems.py --quick            # 24 studies, 40 per class, 2 epochs each

The thesis rows hold out a fifth of the sagittal studies for the test (``split.test_fraction=0.2``: 40 of 200,
against the config's 15 %): a study's 15 images move together, so a test split of 9 studies could not tell a
learning backbone from a guessing one (evidence.md, "Seed systems: the open rows").
"""

from __future__ import annotations

import argparse
import json
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
#: Epochs of each system's run: what two CPU cores train in a few minutes at the benchmark's 64-px images
#: (the larger thesis backbones get fewer). Fixed, so that a figure does not depend on the machine's load.
#: A thesis epoch holds 130 training studies of 15 images (1,950 images: 3.1 times the 42-study set's 630),
#: so the thesis backbones train for about half the epochs they had there and more steps than then.
EPOCHS: dict[str, int] = {
    "thesis_unet": 3,
    "thesis_resnet26": 4, "thesis_resnetrs50": 3, "thesis_inception_resnet_v2": 2, "thesis_swin_s3_tiny": 3,
    "thesis_convnext_tiny": 3,
    "cad_alexnet": 10, "cad_googlenet": 10, "efficientnet_bone": 12, "mobilenet_spine": 15,
}
#: The thesis rows' test share: 40 of the 200 studies (the configs' 15 % would leave 30).
THESIS_TEST_SPLIT = "split.test_fraction=0.2"
WALL_FILE = "bench_wall.json"  # the wall minutes of a system's run, kept beside it for later invocations


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


def train(name: str, out: Path, args: list[str]) -> dict[str, object]:
    """Train one system into ``out`` (emptied first); its command and wall minutes are kept in ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    command, minutes = run(args)
    entry = {"command": command, "minutes": round(minutes, 2)}
    (out / WALL_FILE).write_text(json.dumps(entry), encoding="utf-8")
    return entry


def run_record(out: Path) -> dict[str, object]:
    """The command and wall minutes of the run in ``out`` (empty for a run made before they were kept)."""
    path = out / WALL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def wall(out: Path) -> str:
    """The wall minutes of the run in ``out`` (``–`` when not recorded)."""
    minutes = run_record(out).get("minutes")
    return "–" if minutes is None else f"{minutes:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK / "seeds")
    parser.add_argument("--studies", type=int, default=200, help="sagittal phantom studies")
    parser.add_argument("--per-class", type=int, default=300, help="synthetic radiographs per class")
    parser.add_argument("--size", type=int, default=64, help="classifier image side (the configs use 224-299)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every system (default: each system's own, EPOCHS in this script)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--systems", nargs="*", default=None, help="subset, e.g. thesis_resnet26 cad_alexnet")
    parser.add_argument("--force", action="store_true", help="retrain systems that already have a report")
    parser.add_argument("--quick", action="store_true", help="24 studies, 40 per class, 2 epochs each")
    args = parser.parse_args(argv)
    os.chdir(common.REPO_ROOT)
    if args.quick:
        args.studies, args.per_class, args.epochs = 24, 40, 2
    work = args.work.resolve()
    if work.is_relative_to(common.REPO_ROOT):
        work = work.relative_to(common.REPO_ROOT)
    cpu = ["device=cpu", "train.amp=false", "train.num_workers=0", f"train.threads={args.threads}",
           "train.max_minutes=0"]

    def epochs(name: str) -> str:
        return f"train.epochs={args.epochs or EPOCHS[name]}"

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
    if wanted is None or any(name.startswith("thesis") for name in wanted):  # the thesis classifiers need its mask
        if not (unet / "best.pt").is_file() or (args.force and (wanted is None or "thesis_unet" in wanted)):
            data["thesis_unet"] = train("thesis_unet", unet, [
                "train-2d-seg", "--config", str(SEEDS / "thesis_unet.yaml"), "--data", str(sagittal / "labels.csv"),
                f"run_dir={unet}", epochs("thesis_unet"), *cpu])
        summary = pd.read_csv(unet / "summary.csv")
        rows.append(["thesis_unet", "column U-Net, best val Dice", common.fmt(summary["val_dice"].max(), 3), "—",
                     len(summary), wall(unet)])

    jobs = [(f"thesis_{b}", sagittal / "labels.csv", [f"data.mask_with={unet / 'best.pt'}", THESIS_TEST_SPLIT])
            for b in THESIS]
    jobs += [(name, xr if name.startswith("cad") else xr / "binary.csv", ["data.in_memory=true"]) for name in RADIOGRAPH]
    for name, source, extra in jobs:
        if wanted is not None and name not in wanted:
            continue
        out = work / "runs" / name
        if args.force or not (out / "report" / "test_metrics.csv").is_file():
            size = max(args.size, 80) if "inception" in name else args.size  # its stem needs 75 px
            data[name] = train(name, out, [
                "train-2d", "--config", str(SEEDS / f"{name}.yaml"), "--data", str(source), f"run_dir={out}",
                f"data.image_size={size}", epochs(name), *extra, *cpu])
        report = out / "report"
        ran = len(pd.read_csv(out / "summary.csv"))
        if name.startswith("thesis"):
            study = pd.read_csv(report / "test_study_binary_metrics.csv").iloc[0]
            image = pd.read_csv(report / "test_binary_metrics.csv").iloc[0]
            graded = pd.read_csv(report / "test_metrics.csv").iloc[0]
            rows.append([name, "test accuracy, present vs absent: studies (middle 5) / images; 4 grades (images)",
                         f"{study['accuracy']:.3f} / {image['accuracy']:.3f}; {graded['accuracy']:.3f}",
                         f"{majority(report, 'test_study_binary'):.3f} / {majority(report, 'test_binary'):.3f}; "
                         f"{majority(report, 'test'):.3f}", ran, wall(out)])
            data.setdefault(name, {}).update(study_binary_accuracy=float(study["accuracy"]),
                                             study_binary_roc_auc=float(study["roc_auc"]),
                                             image_binary_accuracy=float(image["accuracy"]),
                                             grade_accuracy=float(graded["accuracy"]), epochs=ran)
        else:
            metrics = pd.read_csv(report / "test_metrics.csv").iloc[0]
            rows.append([name, f"test accuracy ({'3 classes' if name.startswith('cad') else 'binary'}); ROC AUC",
                         f"{metrics['accuracy']:.3f}; {metrics['roc_auc']:.3f}", f"{majority(report, 'test'):.3f}",
                         ran, wall(out)])
            data.setdefault(name, {}).update(accuracy=float(metrics["accuracy"]), roc_auc=float(metrics["roc_auc"]),
                                             epochs=ran)

    table = common.markdown_table(
        ["system", "figure", "measured", "majority class", "epochs run", "wall min (load-dependent)"], rows)
    commands = "\n".join(f"- `{row[0]}`{' (this invocation)' if row[0] in data and 'command' in data[row[0]] else ''}: "
                         f"`{run_record(work / 'runs' / row[0]).get('command', '(not recorded)')}`" for row in rows)
    markdown = (f"{table}\n\nEach system's run, as it was made (a run made by an earlier invocation is "
                f"reused):\n\n{commands}\n")
    print(markdown)
    common.save_results("seed_systems", info, common.command_line(), markdown, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``rsna-cspine demo``: the whole job on a fresh machine in about ten minutes of CPU.

Generates a small synthetic Kaggle-layout dataset, trains stage 1 (3D UNet) and stage 2 (2.5D
classifier, training crops from the ground-truth masks, validation crops from stage 1's, as the test crops
are) briefly, predicts the held-out test studies through the
same pipeline as a real submission (stage-1 predicted masks → crops → stage 2), scores it on the held-out
labels (pooled per-vertebra ROC AUC, sensitivity and specificity at 0.5, competition score next to the
prior baseline), draws one detected fracture beside one cleared vertebra, writes the CV report of the
stage-2 out-of-fold predictions, and prints where everything is.

Output folder::

    OUT/data/            synthetic Kaggle layout (train.csv, test.csv, test_labels.csv, *_images/, segmentations/)
    OUT/work/            the prepared cache (stage-1 grids, masks, stage-2 crops; one decode per study) and
                         validation_stage1/ (stage 2's validation studies cropped with stage 1's masks)
    OUT/runs/seg/        stage-1 run (config.yaml, summary.csv, curves.png, best.pt, last.pt)
    OUT/runs/cls/        stage-2 run (fold0/..., oof_fold0.csv)
    OUT/models/          the models folder predict reads (seg/fold0/best.pt, cls/fold0/best.pt)
    OUT/submission.csv   plus submission.timings.csv
    OUT/cv_report/       report.md, scores.csv, roc.png, reliability.png, confusion.png, ...
    OUT/detection/       detection.png: Grad-CAM of the most confident detected fracture beside a cleared
                         vertebra (plus the ``explain`` pictures of both studies)
    OUT/demo_config.yaml the resolved demo settings
    OUT/demo_summary.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rsna_cspine.config import load_config
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.report.demo_summary import DemoResult, as_json, format_summary, slow_machine_advice

if TYPE_CHECKING:
    import pandas as pd

    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.prepare.config import PrepareConfig
    from rsna_cspine.seg.config import SegConfig

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
_MARKER = "demo_summary.json"
_DATA_DONE = ".demo_data_complete"
_CONFIG_FILE = "demo_config.yaml"


@dataclass
class DemoConfig:
    """Knobs of the demo (``configs/demo.yaml``).

    Attributes:
        minutes: wall-clock target for the whole demo; the two trainings share what data generation
            and ``reserve_s`` leave.
        seed: seeds the dataset and both trainings.
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        synth: ``SynthConfig`` fields for the synthetic dataset (``n_studies``, ``image_size``, ...).
        seg_config: stage-1 YAML (relative paths are looked up in the working folder, then the repository).
        seg_overrides: ``key=value`` overrides of the stage-1 config (the demo then sets its data and run
            folders, seed, device and time budget).
        cls_config: stage-2 YAML.
        cls_overrides: ``key=value`` overrides of the stage-2 config.
        seg_share: stage 1's share of the training time (stage 2 gets the rest).
        reserve_s: seconds kept for prediction, scoring and the report.
        rule: patient_overall rule of the submission (``aggregate.PATIENT_RULES``); the CV report shows it
            (``calibrated`` cross-fitted inside the validation fold) beside plain noisy-OR.
        threshold: vertebra probability counted as a detection (sensitivity, specificity, the picture).
        workers: processes that write the synthetic studies (each study is independent; same files for any
            number).
        min_stage2_epochs: fewer stage-2 epochs than this and the summary says the machine was too slow for
            ``minutes`` and how many minutes would give stage 2 that many.
    """

    minutes: float = 10.0
    seed: int = 0
    device: str = "auto"
    synth: dict[str, Any] = field(default_factory=lambda: {"n_studies": 200, "image_size": 128, "test_fraction": 0.18})
    seg_config: str = "configs/seg_cpu.yaml"
    seg_overrides: list[str] = field(default_factory=list)
    cls_config: str = "configs/cls_cpu.yaml"
    cls_overrides: list[str] = field(default_factory=list)
    seg_share: float = 0.55
    reserve_s: float = 90.0
    rule: str = "calibrated"
    threshold: float = 0.5
    workers: int = 2
    min_stage2_epochs: int = 8


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    return REPO_ROOT / path


def _clean_previous(out_dir: Path) -> None:
    """Refuse a folder that is not a demo's; remove a previous demo's runs and outputs (data and caches stay)."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / _MARKER).is_file() and not (out_dir / "data" / _DATA_DONE).is_file():
        raise ConfigError("folder exists and is not a previous demo's; choose a new folder", out_dir)
    for name in ("runs", "models", "cv_report", "submission.csv.parts"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    shutil.rmtree(out_dir / "detection", ignore_errors=True)
    for name in ("submission.csv", "submission.timings.csv", _MARKER, _CONFIG_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _banner(step: str, text: str) -> None:
    print(f"\n=== [{step}] {text}", flush=True)


def _summary_column(summary_csv: Path, column: str) -> pd.Series:
    """A run's ``summary.csv`` column as numbers, blanks dropped (empty without the file or the column)."""
    import pandas as pd

    if not summary_csv.is_file():
        return pd.Series(dtype=float)
    return pd.to_numeric(pd.read_csv(summary_csv).get(column, pd.Series(dtype=float)), errors="coerce").dropna()


def _best(summary_csv: Path, column: str, mode: str) -> float:
    values = _summary_column(summary_csv, column)
    if values.empty:
        return float("nan")
    return float(values.max() if mode == "max" else values.min())


def _epochs(summary_csv: Path) -> tuple[int, float]:
    """(epochs, mean seconds per epoch) of a run's ``summary.csv``; (0, nan) without one."""
    times = _summary_column(summary_csv, "time_s")
    return len(times), float(times.mean()) if len(times) else float("nan")


def predict_reserve(reserve_s: float, val_crops_s: float, n_val: int, n_test: int) -> float:
    """Seconds kept after stage 2: ``reserve_s``, or more where step 4 showed this machine slower.

    Step 4 did for the validation studies what predict does for the test studies (decode, stage 1, crops), so
    its seconds per study times the test studies, plus 10 s for scoring and the pictures, is predict's time
    here. On the Intel Xeon the demo was tuned on that is under ``reserve_s``; on a 2-core AMD EPYC predict
    took 51-88 s against 45 s kept, and the demo overran its budget (evidence.md, "The demo on a slower CPU").

    Args:
        reserve_s: the configured reserve.
        val_crops_s: step 4's wall time.
        n_val: its studies.
        n_test: the test studies.
    """
    if n_val <= 0:
        return reserve_s
    return max(reserve_s, val_crops_s / n_val * n_test + 10.0)


def write_data(data_dir: Path, config: DemoConfig, seed: int) -> None:
    """Step 1: the synthetic Kaggle-layout dataset (reused when the folder already holds the same settings)."""
    from rsna_cspine.synth import SynthConfig, write_dataset

    synth_cfg = load_config(SynthConfig, values={**config.synth, "seed": seed})
    if (data_dir / _DATA_DONE).is_file() and json.loads((data_dir / _DATA_DONE).read_text()) == repr(synth_cfg):
        _banner("1/8 data", f"reusing the synthetic dataset in {data_dir}")
        return
    _banner("1/8 data", f"writing {synth_cfg.n_studies} synthetic studies ({synth_cfg.image_size} px) to {data_dir}")
    shutil.rmtree(data_dir, ignore_errors=True)
    write_dataset(data_dir, synth_cfg, workers=config.workers)
    (data_dir / _DATA_DONE).write_text(json.dumps(repr(synth_cfg)))


def stage_configs(config: DemoConfig, seed: int, out_dir: Path) -> tuple[SegConfig, ClsConfig, PrepareConfig, list[str]]:
    """The two stages' training configs, the prepared cache they share (one folder per setting) and stage 2's
    validation studies (stage 1 never trains on them)."""
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.train import validation_studies
    from rsna_cspine.prepare import prepare_config_for
    from rsna_cspine.seg.config import SegConfig

    data_dir, runs_dir = out_dir / "data", out_dir / "runs"
    common = {"seed": seed, "device": config.device}
    seg_cfg = load_config(SegConfig, _config_path(config.seg_config), config.seg_overrides,
                          values={"data": {"root": data_dir}, "run_dir": runs_dir / "seg", **common})
    cls_cfg = load_config(ClsConfig, _config_path(config.cls_config), config.cls_overrides,
                          values={"data": {"root": data_dir}, "run_dir": runs_dir / "cls", "fold": 0, **common})
    # Stage 1 never trains on stage 2's validation studies: their crops are cut with its masks (step 4), which
    # must be as good as a test study's, not better.
    val_uids = validation_studies(cls_cfg)
    seg_cfg.data.exclude = (*seg_cfg.data.exclude, *val_uids)
    # A prepared cache refuses other settings: one folder per setting lets a rerun change them.
    prepare_cfg = prepare_config_for(seg_cfg, cls_cfg, mask_source="gt")
    key = hashlib.sha1(repr((prepare_cfg.stage1, prepare_cfg.crop)).encode()).hexdigest()[:8]
    seg_cfg.data.cache_dir = cls_cfg.data.cache_dir = str(out_dir / "work" / f"prepared_{key}")
    return seg_cfg, cls_cfg, prepare_cfg, val_uids


def validation_crops(out_dir: Path, seg_run: Path, uids: list[str], prepare_cfg: PrepareConfig) -> str:
    """Step 4: stage 2's validation studies cropped with the stage-1 model just trained, as the test studies
    will be; stage 2 picks its epoch and fits its vertebra calibration on them (``data.val_cache_dir``).

    Fitted on crops cut with the true masks instead, the calibration missed what stage 1's rough masks do to
    the probabilities (evidence.md, "Per-vertebra calibration").

    Args:
        seg_run: the stage-1 run's fold folder (its ``best.pt``).
        uids: stage 2's validation studies.
        prepare_cfg: the settings of the training crops (the mask source is replaced).

    Returns:
        The cache folder (``""`` when the fold has no validation study).
    """
    from dataclasses import replace

    from rsna_cspine.prepare import prepare_dataset

    cache = out_dir / "work" / "validation_stage1"
    if not uids:  # a fold without validation studies: nothing to crop
        return ""
    _banner("4/8 validation crops", f"stage 2's {len(uids)} validation studies cropped with stage 1's masks")
    prepare_dataset(out_dir / "data", cache, replace(prepare_cfg, mask_source="pred"), seg_models=seg_run / "best.pt",
                    studies=uids, restart=True, stage1_studies=())  # this run's stage 1; crops only
    return str(cache)


def predict_test(out_dir: Path, runs: dict[str, tuple[Path, int]], config: DemoConfig) -> pd.DataFrame:
    """Step 6: copy the trained models to ``OUT/models`` and predict ``test.csv`` exactly as a submission would.

    Args:
        runs: stage (``seg``, ``cls``) → (its run's fold folder, its fold number).
    """
    from rsna_cspine.pipeline import PipelineConfig, predict_dataset

    for stage, (run, fold) in runs.items():
        target = out_dir / "models" / stage / f"fold{fold}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "config.yaml"):
            shutil.copy2(run / name, target / name)
    _banner("6/8 predict", f"test.csv studies → {out_dir / 'submission.csv'}")
    return predict_dataset(out_dir / "data", out_dir / "models", out_dir / "submission.csv",
                           cfg=PipelineConfig(device=config.device, rule=config.rule, resume=False))


def draw_detection(out_dir: Path, submission: pd.DataFrame, test_labels: pd.DataFrame, config: DemoConfig) -> Path | None:
    """Step 8a: Grad-CAM of the most confident detected fracture beside a cleared vertebra (None: not drawn)."""
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.report.heldout import draw_detection_picture, vertebra_table

    detection: Path | None = None
    try:
        detection = draw_detection_picture(out_dir / "models", KaggleLayout(out_dir / "data").test_images,
                                           vertebra_table(submission, test_labels), out_dir / "detection",
                                           config.threshold, device=config.device)
    except Exception as exc:  # noqa: BLE001 - the scores stand without the picture; say why it is missing
        logger.warning("detection picture not drawn (%s: %s)", exc.__class__.__name__, exc)
    if detection is None:
        logger.warning("no detection picture: no fractured test vertebra with crops reached p >= %.2f", config.threshold)
    return detection


def run_demo(
    out_dir: str | Path,
    minutes: float | None = None,
    seed: int | None = None,
    config: DemoConfig | None = None,
) -> DemoResult:
    """Synthetic data → train both stages → predict → score → CV report (each step a function above).

    Args:
        out_dir: demo folder (created; a previous demo's runs in it are replaced, its data reused).
        minutes: overrides ``config.minutes`` (default 10).
        seed: overrides ``config.seed`` (default 0).
        config: demo settings; default ``configs/demo.yaml`` (or the built-in defaults without it).

    Returns:
        Paths of the artefacts and the scores.
    """
    started = time.monotonic()  # before the heavy imports below: they are part of the demo's ten minutes
    from rsna_cspine.cls.train import train_classifier
    from rsna_cspine.io.kaggle import KaggleLayout, read_test_csv, read_train_labels
    from rsna_cspine.metric import prior_predictions
    from rsna_cspine.pipeline import timing_log_path
    from rsna_cspine.prepare import prepare_dataset
    from rsna_cspine.report.cv import cv_report, load_oof
    from rsna_cspine.report.heldout import score_heldout
    from rsna_cspine.seg.train import study_sources, train_segmentation

    if config is None:
        config = load_config(DemoConfig, DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    minutes = config.minutes if minutes is None else float(minutes)
    seed = config.seed if seed is None else int(seed)
    if minutes <= 0 or not 0.0 < config.seg_share < 1.0:
        raise ConfigError(f"minutes must be > 0 and seg_share in (0, 1); got {minutes}, {config.seg_share}")
    budget_s = minutes * 60.0
    out_dir = Path(out_dir)
    _clean_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    # The resolved settings beside the results (the cross-check reads the rule and threshold from it).
    (out_dir / _CONFIG_FILE).write_text(yaml.safe_dump({**asdict(config), "minutes": minutes, "seed": seed}, sort_keys=False))
    data_dir = out_dir / "data"

    tick = time.monotonic()
    write_data(data_dir, config, seed)
    seconds["data"] = time.monotonic() - tick
    layout = KaggleLayout(data_dir)
    train_labels = read_train_labels(layout.train_csv)
    seg_cfg, cls_cfg, prepare_cfg, val_uids = stage_configs(config, seed, out_dir)

    # 2. Data preparation first, so that the training budgets below are spent on training alone.
    tick = time.monotonic()
    _banner("2/8 prepare", "one decode per training study: stage-2 crops (ground-truth masks), and stage-1 grids of "
            "the studies stage 1 trains on")
    prepare_dataset(data_dir, seg_cfg.data.cache_dir, prepare_cfg, stage1_studies=list(study_sources(seg_cfg.data)))
    seconds["caches"] = time.monotonic() - tick

    reserve_s = config.reserve_s

    def training_minutes(share: float) -> float:
        left = budget_s - (time.monotonic() - started) - reserve_s
        return max(left * share, 20.0) / 60.0

    # 3. Stage 1. Its trainer stops before an epoch that would overrun its budget; stage 2 gets the rest.
    tick = time.monotonic()
    seg_cfg.train.max_minutes = training_minutes(config.seg_share)
    _banner("3/8 stage 1", f"training the 3D UNet for ≤ {seg_cfg.train.max_minutes:.1f} min ({config.seg_config})")
    seg_run = train_segmentation(seg_cfg)
    seconds["stage1"] = time.monotonic() - tick

    # 4. Stage 2's validation crops, cut as the test crops will be.
    tick = time.monotonic()
    cls_cfg.data.val_cache_dir = validation_crops(out_dir, seg_run, val_uids, prepare_cfg)
    seconds["val_crops"] = time.monotonic() - tick

    # 5. Stage 2, on what is left: at least what step 4's pace says predicting the test studies will take.
    test = read_test_csv(layout.test_csv)
    reserve_s = predict_reserve(config.reserve_s, seconds["val_crops"], len(val_uids), test["StudyInstanceUID"].nunique())
    tick = time.monotonic()
    cls_cfg.train.max_minutes = training_minutes(1.0)
    _banner("5/8 stage 2", f"training the 2.5D classifier for ≤ {cls_cfg.train.max_minutes:.1f} min ({config.cls_config}); "
            f"{reserve_s:.0f} s kept for predict and the report")
    cls_run = train_classifier(cls_cfg)
    seconds["stage2"] = time.monotonic() - tick

    tick = time.monotonic()
    submission = predict_test(out_dir, {"seg": (seg_run, seg_cfg.fold), "cls": (cls_run, cls_cfg.fold)}, config)
    seconds["predict"] = time.monotonic() - tick

    # 7. Score against the held-out truth, next to the prior every model must beat.
    tick = time.monotonic()
    _banner("7/8 score", "held-out test labels: per-vertebra ROC AUC, sensitivity/specificity, competition metric")
    test_labels = read_train_labels(data_dir / "test_labels.csv")
    test_labels = test_labels[test_labels["StudyInstanceUID"].isin(set(test["StudyInstanceUID"]))]
    heldout = score_heldout(submission, test_labels, prior_predictions(train_labels), config.threshold)
    seconds["score"] = time.monotonic() - tick

    # 8. What a newcomer should see: one detected fracture beside one cleared vertebra, and the CV report.
    tick = time.monotonic()
    _banner("8/8 report", "Grad-CAM of the most confident detected fracture; CV report of the out-of-fold predictions")
    detection = draw_detection(out_dir, submission, test_labels, config)
    report = cv_report(load_oof(Path(cls_cfg.run_dir)), train_labels, out_dir / "cv_report", rule=config.rule)
    seconds["report"] = time.monotonic() - tick
    seconds["total"] = time.monotonic() - started

    stage2_epochs, epoch_s = _epochs(cls_run / "summary.csv")
    pictures = sorted(p for p in report["files"].values() if str(p).endswith(".png"))
    pictures += [p for p in (seg_run / "curves.png", cls_run / "curves.png") if p.is_file()]
    result = DemoResult(
        out_dir=out_dir,
        submission=out_dir / "submission.csv",
        timings=timing_log_path(out_dir / "submission.csv"),
        cv_report=Path(report["files"]["report"]),
        pictures=pictures,
        models_dir=out_dir / "models",
        score=heldout.score,
        prior_score=heldout.prior_score,
        heldout=heldout,
        detection_picture=detection,
        seg_dice=_best(seg_run / "summary.csv", "val_dice_mean", "max"),
        cv_score=float(report["scores"]["study"]["model"]),
        n_test=heldout.n_studies,
        seconds={k: round(v, 1) for k, v in seconds.items()},
        stage2_epochs=stage2_epochs,
        # Fewer epochs than configured: the budget stopped stage 2 (the demo trains with patience 0).
        advice=slow_machine_advice(stage2_epochs, epoch_s, minutes, config.seg_share,
                                   min(config.min_stage2_epochs, cls_cfg.train.epochs)),
    )
    (out_dir / _MARKER).write_text(json.dumps(as_json(result), indent=2) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``demo`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--out", type=Path, default=Path("demo"), help="demo folder (default ./demo)")
    parser.add_argument("--minutes", type=float, default=None, help="time target in minutes (default: the config's, 9.3 in configs/demo.yaml)")
    parser.add_argument("--seed", type=int, default=None, help="dataset and training seed (default 0)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="demo YAML (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig settings, e.g. synth.n_studies=30")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the summary.

    Args:
        args: parsed options of ``add_arguments``.

    Returns:
        0 on success, 1 when a setting or input is invalid (the reason is logged).
    """
    # The JPEG 2000 encoder logs every tile at INFO: thousands of lines that would bury the demo's progress.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    try:
        config = load_config(DemoConfig, args.config if args.config.is_file() else None, args.overrides)
        result = run_demo(args.out, minutes=args.minutes, seed=args.seed, config=config)
    except CSpineError as exc:
        logger.error("%s", exc)
        return 1
    print(format_summary(result))
    return 0

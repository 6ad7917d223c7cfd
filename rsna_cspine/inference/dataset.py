"""A whole dataset: the studies of test.csv → a complete, valid submission (or one shard of it).

:func:`predict_dataset` takes the studies from test.csv (never a directory listing) and runs
:class:`~rsna_cspine.inference.predictor.FracturePipeline` over them through the project's
:class:`~rsna_cspine.runner.StudyRunner`: one shard of them if asked, finished studies of an
interrupted run resumed from ``<out>.parts/``, every failure given the prior and logged with its cause.
A :class:`~rsna_cspine.inference.budget.PredictionBudget` picks each study's path so the run ends in
time. Whatever happens, the file written is complete, finite and valid.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna_cspine.aggregate import build_submission, write_submission
from rsna_cspine.inference.budget import PredictionBudget
from rsna_cspine.inference.config import PipelineConfig
from rsna_cspine.inference.predictor import STAGES, FracturePipeline, StudyPrediction
from rsna_cspine.inference.shards import write_shard
from rsna_cspine.io.files import atomic_write_text
from rsna_cspine.io.kaggle import KaggleLayout, check_test_frame, read_test_csv, read_train_labels, test_studies
from rsna_cspine.metric import prior_predictions
from rsna_cspine.runner import BatchReport, StudyLedger, StudyRunner, StudySkipped, shard_studies

logger = logging.getLogger(__name__)

TIMING_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID",
    "path",
    "status",
    *(f"{stage}_s" for stage in STAGES),
    "total_s",
    "n_slices",
    "vertebrae_found",
    "qc",
    "resumed",
    "reason",
)


def timing_log_path(out_csv: str | Path) -> Path:
    """``submission.csv`` → ``submission.timings.csv`` (the per-study timing log beside the output)."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.timings.csv")


def parts_dir(out_csv: str | Path) -> Path:
    """``submission.csv`` → ``submission.csv.parts/`` (the ledger of finished studies, for resuming)."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name + ".parts")


def dataset_prior(layout: KaggleLayout, cfg: PipelineConfig) -> np.ndarray | None:
    """The prior ``cfg.prior`` names for a dataset's studies; None when it is the models' (known once they are loaded)."""
    if cfg.prior == "real":
        return prior_predictions(None)
    if cfg.prior == "train_csv" and layout.train_csv.is_file():
        labels = read_train_labels(layout.train_csv)
        if len(labels):
            prior = prior_predictions(labels)
            logger.info("prior from %s: %s", layout.train_csv, np.round(prior, 4).tolist())
            return prior
        logger.info("%s has no labelled study: the prior is the models' training prevalence", layout.train_csv)
    return None


def _record(uid: str, path: str, status: str, reason: str = "", prediction: StudyPrediction | None = None) -> dict[str, Any]:
    """One row of the timing log (and, for a predicted study, its ledger record with the probabilities)."""
    record: dict[str, Any] = {"StudyInstanceUID": uid, "path": path, "status": status, "resumed": False, "reason": reason}
    timings = prediction.timings if prediction is not None else {}
    for stage in STAGES:
        record[f"{stage}_s"] = round(timings[stage], 4) if stage in timings else None
    record["total_s"] = round(timings["total"], 4) if "total" in timings else None
    record["n_slices"] = prediction.n_slices if prediction is not None else None
    record["vertebrae_found"] = prediction.vertebrae_found if prediction is not None else None
    record["qc"] = prediction.qc if prediction is not None else ""
    if prediction is not None:
        record["probs"] = [float(v) for v in prediction.probs]
    return record


def predict_studies(
    pipeline: FracturePipeline,
    study_path: Callable[[str], Path],
    uids: list[str],
    out_csv: Path,
    budget: PredictionBudget,
    progress: bool,
    resume: bool,
    data: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The per-study loop of every prediction run: resume, choose a path, predict, never raise for a study.

    Args:
        pipeline: the loaded models.
        study_path: a study's folder or file from its name.
        uids: the studies' names, in output order.
        out_csv: the output (its ``.parts/`` ledger lies beside it).
        budget: picks each study's path.
        progress: tqdm bar.
        resume: reuse the studies an earlier run with the same models, settings and ``data`` finished.
        data: what identifies the inputs in the ledger's fingerprint.

    Returns:
        One timing-log record per study (in ``uids`` order) and the probabilities of the predicted ones.
    """
    fingerprint = {**pipeline.fingerprint(), **data}
    runner = StudyRunner(StudyLedger(parts_dir(out_csv), fingerprint, resume=resume), desc="predict", progress=progress)
    plan = runner.plan(uids)
    started = itertools.count()
    chosen: dict[str, str] = {}

    def predict_one(uid: str) -> dict[str, Any]:
        # Studies still to run, this one included: resumed ones cost nothing.
        chosen[uid] = path = budget.choose(len(plan.todo) - next(started))
        if path == "prior":
            raise StudySkipped("time budget: not enough time left")
        prediction = pipeline.predict_study(study_path(uid), path=path)
        for note in prediction.warnings:
            logger.info("study %s: %s", uid, note)
        budget.record(path, prediction.timings["total"])
        return _record(uid, path, "ok", "; ".join(prediction.warnings), prediction)

    return _timing_records(runner.run(plan, predict_one), chosen)


def _timing_records(
    report: BatchReport, chosen: dict[str, str]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Timing-log rows (one per study, in order) and the probabilities of the predicted studies."""
    records: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    for outcome in report.outcomes:
        if outcome.status in ("done", "resumed"):
            record = {**outcome.record, "resumed": outcome.status == "resumed"}  # type: ignore[dict-item]
            predictions[outcome.uid] = np.asarray(record["probs"], dtype=np.float64)
        elif outcome.status == "skipped":
            record = _record(outcome.uid, "prior", "budget", outcome.reason)
        else:
            record = _record(outcome.uid, chosen.get(outcome.uid, "full"), "failed", outcome.reason)
        records.append(record)
    fresh = [r["path"] for r in records if r["status"] == "ok" and not r["resumed"]]
    logger.info(
        "%d studies: %d full path, %d cheap path, %d prior (time budget), %d failed (prior), %d resumed",
        len(records), fresh.count("full"), fresh.count("cheap"), report.count("skipped"), report.count("failed"),
        report.count("resumed"),
    )  # fmt: skip
    return records, predictions


def load_pipeline(
    models_dir: str | Path,
    cfg: PipelineConfig,
    prior: np.ndarray | None,
    uids: list[str],
    pipeline: FracturePipeline | None = None,
) -> tuple[FracturePipeline | None, np.ndarray, list[dict[str, Any]]]:
    """The models of a prediction run, its prior, and the records of the studies when there are no models.

    Args:
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints.
        cfg: pipeline settings.
        prior: ``(8,)`` fallback, or None for the models' stored training prevalence.
        uids: the studies (each gets a prior record when the models cannot be used).
        pipeline: an already loaded pipeline (its prior is used).

    Returns:
        ``(pipeline or None, prior, records)``: without a pipeline every study has a record (``failed``
        when the models did not load, ``budget`` for a time budget of 0) and the prior is the real prevalence
        unless one was given.
    """
    if pipeline is not None:
        return pipeline, pipeline.prior, []  # one prior for absent vertebrae and failed studies alike
    fallback = prior_predictions(None) if prior is None else prior
    if not uids or (cfg.time_budget_s is not None and cfg.time_budget_s <= 0):
        return None, fallback, [_record(uid, "prior", "budget", "time budget is 0") for uid in uids]
    try:
        pipeline = FracturePipeline.from_models_dir(models_dir, cfg, prior)
    except Exception as exc:  # noqa: BLE001 - without models the output is still written, all prior
        logger.error("could not load the models from %s (%s): every study gets the prior", models_dir, exc)
        return None, fallback, [_record(uid, "prior", "failed", f"models: {exc}") for uid in uids]
    return pipeline, pipeline.prior, []


def predict_dataset(
    data_dir: str | Path,
    models_dir: str | Path,
    out_csv: str | Path,
    shard: tuple[int, int] | None = None,
    cfg: PipelineConfig | None = None,
    progress: bool = True,
    pipeline: FracturePipeline | None = None,
) -> pd.DataFrame:
    """Predict every study of ``<data>/test.csv`` and write the submission (or one shard of it).

    Studies come from test.csv, in its order. A study that fails at any stage gets the prior, a
    warning naming it and the cause, and the run goes on; the file written is always complete, finite
    and valid. Beside it: ``<stem>.timings.csv`` (one row per study: path, status, seconds per stage,
    fallback reason) and ``<out>.parts/`` (finished studies, so that a rerun skips them).

    Args:
        data_dir: Kaggle-layout folder (``test.csv``, ``test_images/<UID>/*.dcm``, optional ``train.csv``).
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints (see ``inference.predictor``).
        out_csv: the submission, or with ``shard`` the shard file that ``merge_shards`` joins.
        shard: ``(i, n)`` to predict only studies ``k`` of test.csv with ``k % n == i``.
        cfg: pipeline settings (defaults when ``None``).
        progress: show a tqdm bar.
        pipeline: an already loaded pipeline (notebooks, tests; its prior and split are used); else built
            from ``models_dir`` with ``cfg`` (the prior: see ``PipelineConfig.prior``).

    Returns:
        The rows written: ``row_id, fractured`` in test.csv order (only the shard's studies with ``shard``).
    """
    cfg = cfg or PipelineConfig()
    cfg.validate()
    # The budget covers the whole call, model loading included: that is what the Kaggle limit counts.
    budget = PredictionBudget(cfg.time_budget_s, cfg.budget_safety)
    layout = KaggleLayout(Path(data_dir))
    out_csv = Path(out_csv)
    test = read_test_csv(layout.test_csv)
    all_uids = test_studies(test)
    uids = all_uids if shard is None else shard_studies(all_uids, shard)
    prior = dataset_prior(layout, cfg)
    shard_note = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    logger.info("%d studies to predict%s from %s", len(uids), shard_note, layout.test_csv)

    predictions: dict[str, np.ndarray] = {}
    pipeline, prior, records = load_pipeline(models_dir, cfg, prior, uids, pipeline)
    if pipeline is not None:
        split = pipeline.cfg.split
        records, predictions = predict_studies(
            pipeline, lambda uid: layout.study_path(uid, split), uids, out_csv, budget, progress, cfg.resume,
            {"data": str(layout.root.resolve()), "split": split},
        )

    timings = pd.DataFrame(records).reindex(columns=list(TIMING_COLUMNS))
    timings = timings.astype({"n_slices": "Int64", "vertebrae_found": "Int64", "resumed": bool})
    atomic_write_text(timing_log_path(out_csv), timings.to_csv(index=False))

    selected = check_test_frame(test[test["StudyInstanceUID"].isin(set(uids))], source=layout.test_csv)
    if uids:
        submission, fallback = build_submission(selected, predictions, fallback=prior)
    else:  # a shard beyond the number of studies: an empty (but well-formed) shard file
        submission, fallback = pd.DataFrame({"row_id": pd.Series(dtype=str), "fractured": pd.Series(dtype=float)}), []
    if shard is None:
        write_submission(submission, out_csv, test)
    else:
        write_shard(submission, out_csv, shard, uids, layout.test_csv)
    logger.info(
        "wrote %s (%d rows, %d studies, %d with the prior); timings in %s",
        out_csv,
        len(submission),
        len(uids),
        len(fallback),
        timing_log_path(out_csv),
    )
    return submission

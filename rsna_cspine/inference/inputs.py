"""Studies a user names (DICOM folders, Enhanced CT files, NIfTI files, folders of them) → ``predictions.csv``.

Outside the Kaggle layout there is no test.csv: :func:`predict_inputs` finds the studies in the paths
(:func:`~rsna_cspine.io.study.find_studies`), runs them through the same per-study loop as
:func:`~rsna_cspine.inference.dataset.predict_dataset` (resume from ``<out>.parts/``, time budget, a
failing study logged and given the prior) and writes one row per study. The fallback prior is the
training prevalence stored in the stage-2 checkpoints, never a train.csv.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_cspine.constants import TARGET_COLUMNS
from rsna_cspine.inference.budget import PredictionBudget
from rsna_cspine.inference.config import PipelineConfig
from rsna_cspine.inference.dataset import TIMING_COLUMNS, load_pipeline, predict_studies, timing_log_path
from rsna_cspine.inference.predictor import FracturePipeline
from rsna_cspine.io.files import atomic_write_text
from rsna_cspine.io.study import find_studies
from rsna_cspine.metric import prior_predictions

logger = logging.getLogger(__name__)

#: Columns of ``predictions.csv``.
PREDICTION_COLUMNS: tuple[str, ...] = ("study", "input", *TARGET_COLUMNS, "qc", "status", "reason")

#: What each column of ``predictions.csv`` holds (the README's table is written from this).
PREDICTION_COLUMN_HELP: dict[str, str] = {
    "study": "the study's name: its folder's name, or its file's name without .nii.gz/.nii/.dcm "
             "(_2, _3 ... appended when two inputs share a name)",
    "input": "the folder or file it was read from",
    "C1..C7": "probability that the vertebra is fractured (the prior where it was not found or the study failed)",
    "patient_overall": "probability of any cervical fracture (the configured rule, default calibrated)",
    "qc": "stage 1's anatomical quality check in one line: the vertebrae kept, absent, and dropped with the "
          "reason (a dropped vertebra takes the prior); empty for a study not predicted",
    "status": "ok (predicted), failed (could not be read or predicted: prior) or budget (out of time: prior)",
    "reason": "why a study failed or was skipped, or the loader's notes about repairs",
}


def predict_inputs(
    inputs: Sequence[str | Path],
    models_dir: str | Path,
    out_csv: str | Path,
    cfg: PipelineConfig | None = None,
    progress: bool = True,
    pipeline: FracturePipeline | None = None,
) -> pd.DataFrame:
    """Predict every study the inputs hold and write ``predictions.csv`` (one row per study, in input order).

    Beside it: ``<stem>.timings.csv`` (seconds per stage) and ``<out>.parts/`` (finished studies, so that
    a rerun with the same models and settings skips them). The table is always complete: a study that
    cannot be read or predicted gets the prior, ``status`` ``failed`` and the cause in ``reason``.

    Args:
        inputs: study folders of DICOM files, Enhanced CT files, NIfTI files, or folders of them.
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints.
        out_csv: the predictions table to write.
        cfg: pipeline settings (defaults when None); ``prior: real`` keeps the real prevalence, anything
            else takes the models' stored training prevalence.
        progress: tqdm bar.
        pipeline: an already loaded pipeline (notebooks, tests).

    Returns:
        The table written (:data:`PREDICTION_COLUMNS`).

    Raises:
        LayoutError: an input that does not exist or holds no study.
    """
    cfg = cfg or PipelineConfig()
    cfg.validate()
    budget = PredictionBudget(cfg.time_budget_s, cfg.budget_safety)
    out_csv = Path(out_csv)
    studies = find_studies(inputs)
    paths = {study.name: study.path for study in studies}
    uids = list(paths)
    logger.info("%d studies to predict from %d input(s)", len(uids), len(inputs))
    prior = prior_predictions(None) if cfg.prior == "real" else None
    pipeline, prior, records = load_pipeline(models_dir, cfg, prior, uids, pipeline)
    predictions: dict[str, np.ndarray] = {}
    if pipeline is not None:
        data = {"inputs": {uid: str(path.resolve()) for uid, path in paths.items()}}
        records, predictions = predict_studies(pipeline, paths.__getitem__, uids, out_csv, budget, progress,
                                               cfg.resume, data)

    rows = []
    for record in records:
        uid = record["StudyInstanceUID"]
        probs = predictions.get(uid, prior)
        rows.append({"study": uid, "input": str(paths[uid]), **dict(zip(TARGET_COLUMNS, map(float, probs))),
                     "qc": record.get("qc") or "", "status": record["status"], "reason": record.get("reason") or ""})
    table = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    if not np.isfinite(table[list(TARGET_COLUMNS)].to_numpy(np.float64)).all():
        raise AssertionError("non-finite probability in the predictions table")  # the prior fills every gap
    atomic_write_text(out_csv, table.to_csv(index=False))
    timings = pd.DataFrame(records).reindex(columns=list(TIMING_COLUMNS))
    atomic_write_text(timing_log_path(out_csv), timings.to_csv(index=False))
    counts = table["status"].value_counts().to_dict()
    logger.info("wrote %s (%d studies: %s); timings in %s", out_csv, len(table), counts, timing_log_path(out_csv))
    return table

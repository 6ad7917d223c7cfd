"""Inference: DICOM studies → vertebra and patient fracture probabilities → submission.csv.

* :mod:`~rsna_cspine.inference.config`: :class:`PipelineConfig`, the settings of a prediction run;
* :mod:`~rsna_cspine.inference.predictor`: :class:`FracturePipeline`, one study at a time through
  public steps (load, segment, crop, classify, aggregate) that return their intermediates;
* :mod:`~rsna_cspine.inference.budget`: :class:`PredictionBudget`, the path each study can afford;
* :mod:`~rsna_cspine.inference.dataset`: :func:`predict_dataset`, test.csv → a complete submission;
* :mod:`~rsna_cspine.inference.inputs`: :func:`predict_inputs`, any studies (DICOM folders, Enhanced CT,
  NIfTI) → ``predictions.csv``;
* :mod:`~rsna_cspine.inference.shards`: shard files and :func:`merge_shards`.

The per-study loop (shards, resume, failure list, progress) is :class:`rsna_cspine.runner.StudyRunner`,
shared with ``predict-seg`` and the training caches.
"""

from rsna_cspine.inference.budget import PredictionBudget
from rsna_cspine.inference.config import PipelineConfig
from rsna_cspine.inference.dataset import TIMING_COLUMNS, parts_dir, predict_dataset, timing_log_path
from rsna_cspine.inference.inputs import PREDICTION_COLUMNS, predict_inputs
from rsna_cspine.inference.predictor import (
    STAGES,
    FracturePipeline,
    StudyFailure,
    StudyIntermediates,
    StudyPrediction,
    find_checkpoints,
)
from rsna_cspine.inference.shards import SHARD_FORMAT, merge_shards, read_shard, write_shard
from rsna_cspine.runner import parse_shard, shard_studies

__all__ = [
    "PREDICTION_COLUMNS",
    "SHARD_FORMAT",
    "STAGES",
    "TIMING_COLUMNS",
    "FracturePipeline",
    "PipelineConfig",
    "PredictionBudget",
    "StudyFailure",
    "StudyIntermediates",
    "StudyPrediction",
    "find_checkpoints",
    "merge_shards",
    "parse_shard",
    "parts_dir",
    "predict_dataset",
    "predict_inputs",
    "read_shard",
    "shard_studies",
    "timing_log_path",
    "write_shard",
]

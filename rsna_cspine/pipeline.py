"""The end-to-end names under their short, stable import path (the Kaggle notebook and the bundle use it).

Everything lives in :mod:`rsna_cspine.inference`; this module only re-exports what a notebook needs.
"""

from rsna_cspine.inference import FracturePipeline, PipelineConfig, find_checkpoints, predict_dataset, timing_log_path

__all__ = ["FracturePipeline", "PipelineConfig", "find_checkpoints", "predict_dataset", "timing_log_path"]

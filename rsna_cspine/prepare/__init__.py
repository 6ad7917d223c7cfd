"""Data preparation at scale: one decode per study, every training input written from it, sharded, resumable.

``rsna-cspine prepare`` (:func:`prepare_dataset`) writes a prepared cache (layout in
:mod:`rsna_cspine.training.prepared`) that both trainers read without touching DICOM.
"""

from rsna_cspine.training.prepared import MANIFEST_COLUMNS, PreparedCache, merge_caches
from rsna_cspine.prepare.config import (
    MASK_SOURCES,
    PrepareConfig,
    Stage1InputConfig,
    prepare_config_for,
    resolve_seg_models,
    settings_fingerprint,
)
from rsna_cspine.prepare.run import PrepareSummary, largest_first, prepare_dataset, select_studies
from rsna_cspine.prepare.study import StudyJob, prepare_study, study_inputs, study_size

__all__ = [
    "MANIFEST_COLUMNS",
    "MASK_SOURCES",
    "PrepareConfig",
    "PrepareSummary",
    "PreparedCache",
    "Stage1InputConfig",
    "StudyJob",
    "largest_first",
    "merge_caches",
    "prepare_config_for",
    "prepare_dataset",
    "prepare_study",
    "resolve_seg_models",
    "select_studies",
    "settings_fingerprint",
    "study_inputs",
    "study_size",
]

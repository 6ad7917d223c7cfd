"""Names shared by every stage: vertebra labels, competition columns and weights."""

from __future__ import annotations

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
#: Column order of train.csv's targets and of every (n_studies, 8) prediction array in the project.
TARGET_COLUMNS: tuple[str, ...] = VERTEBRAE + ("patient_overall",)

#: Segmentation label values as in the RSNA NIfTI files: 1..7 = C1..C7, 8..19 = T1..T12, 0 = background.
CERVICAL_LABELS: tuple[int, ...] = tuple(range(1, 8))
THORACIC_LABELS: tuple[int, ...] = tuple(range(8, 20))

#: Competition weights (negative, positive) for vertebra rows and the patient_overall row.
VERTEBRA_WEIGHTS: tuple[float, float] = (1.0, 2.0)
PATIENT_WEIGHTS: tuple[float, float] = (7.0, 14.0)

#: Prevalence in the real train.csv (2,019 studies), used as the prior/fallback prediction.
REAL_PREVALENCE: dict[str, float] = {
    "C1": 146 / 2019,
    "C2": 285 / 2019,
    "C3": 73 / 2019,
    "C4": 108 / 2019,
    "C5": 162 / 2019,
    "C6": 277 / 2019,
    "C7": 393 / 2019,
    "patient_overall": 961 / 2019,
}

#: Clip applied to probabilities before any log and before writing a submission.
PROB_EPS: float = 1e-7

#: Studies of the real training set that top teams dropped as broken scans (the 2nd-place write-up:
#: "we ignored the wrong study 1.2.826.0.1.3680043.20574 and 1.2.826.0.1.3680043.29952"; public solution
#: code cites Kaggle discussion 344862 for both). The trainers' default ``data.exclude``.
KNOWN_BROKEN_STUDIES: tuple[str, ...] = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")

"""rsna_cspine: RSNA 2022 cervical-spine fracture detection, from DICOM series to submission.csv."""

from __future__ import annotations

__version__ = "0.1.0"

"""Input/output: DICOM series → Volume, NIfTI → aligned labels, Kaggle-layout tables."""

from __future__ import annotations

from rsna_cspine.io.volume import Volume

__all__ = ["Volume"]

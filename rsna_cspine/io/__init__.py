"""Input/output: DICOM series (single- or multi-frame) and NIfTI CT → Volume, NIfTI → aligned labels,
any study → Volume (``io.study``), Kaggle-layout tables.

Heavy decoders are imported by the submodules only when a series is actually loaded.
"""

from __future__ import annotations

from rsna_cspine.io.volume import Volume

__all__ = ["Volume"]

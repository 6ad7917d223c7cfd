"""An in-memory ``Volume`` with plain axial geometry, for the tests that need HU and a mask but no DICOM files."""

from __future__ import annotations

import numpy as np

from rsna_cspine.io.volume import Volume


def axial_volume(hu: np.ndarray, spacing: tuple[float, float, float] = (1.0, 0.5, 0.5), study_uid: str = "") -> Volume:
    """``hu`` as a study: superior slice first, ``spacing[0]`` mm apart, identity orientation, files 1..n.

    Args:
        hu: ``(z, y, x)`` Hounsfield units (stored as float32).
        spacing: ``(dz, dy, dx)`` in mm.
        study_uid: the study's UID (what log messages name).
    """
    n = hu.shape[0]
    return Volume(
        hu=hu.astype(np.float32),
        spacing=spacing,
        positions=np.stack([np.zeros(n), np.zeros(n), -spacing[0] * np.arange(n, dtype=float)], axis=1),
        row_cosine=np.array([1.0, 0.0, 0.0]),
        col_cosine=np.array([0.0, 1.0, 0.0]),
        slice_numbers=np.arange(1, n + 1),
        study_uid=study_uid,
    )

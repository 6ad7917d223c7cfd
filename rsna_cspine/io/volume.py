"""The in-memory study: a Hounsfield-unit volume and the geometry that places it in the patient.

Axis convention used everywhere in the project: arrays are indexed ``(z, y, x)`` where
``z`` runs over axial slices from superior (head, C1) to inferior (thorax), ``y`` over image rows
and ``x`` over image columns, exactly as the pixels are stored in each DICOM slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: File endings of the inputs a study may be given as, besides a folder of DICOM slices.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")


def study_name(path: str | Path) -> str:
    """The name a study goes by: its folder's name, or its file's name without ``.nii.gz``/``.nii``/``.dcm``.

    Args:
        path: a study folder, NIfTI file or DICOM file.
    """
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Volume:
    """A loaded CT series.

    Attributes:
        hu: float32 array ``(z, y, x)`` in Hounsfield units.
        spacing: ``(dz, dy, dx)`` in mm; ``dz`` is the distance between consecutive slice positions.
        positions: ``(z, 3)`` ImagePositionPatient (LPS, mm) of each slice, in array order.
        row_cosine: direction (LPS) of increasing column index ``x`` (IOP[:3]).
        col_cosine: direction (LPS) of increasing row index ``y`` (IOP[3:]).
        slice_numbers: ``(z,)`` the number in each source file's name (``12`` for ``12.dcm``), in array
            order; ``-1`` where a name has no number. This is what maps a mask slice back to a file.
        files: source file name of each slice, in array order.
        reversed_numbering: True when file numbers decrease from superior to inferior (InstanceNumber
            decides when the file names carry no number; meaningless for shuffled numbering).
        study_uid: StudyInstanceUID (the folder name when the header lacks it).
        warnings: human-readable notes about repairs made while loading (dropped slices, gaps, ...).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    slice_numbers: np.ndarray
    files: list[str] = field(default_factory=list)
    reversed_numbering: bool = False
    study_uid: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_direction(self) -> np.ndarray:
        """Unit vector (LPS) from slice ``z`` to slice ``z + 1``."""
        if len(self.positions) > 1:
            step = self.positions[-1] - self.positions[0]
            norm = np.linalg.norm(step)
            if norm > 0:
                return step / norm
        normal = np.cross(self.row_cosine, self.col_cosine)
        # One slice: choose the superior→inferior sense the rest of the project assumes.
        return -normal if normal[2] > 0 else normal

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping a voxel index ``(z, y, x, 1)`` to LPS millimetres."""
        dz, dy, dx = self.spacing
        out = np.eye(4)
        out[:3, 0] = self.slice_direction * dz
        out[:3, 1] = np.asarray(self.col_cosine, dtype=float) * dy
        out[:3, 2] = np.asarray(self.row_cosine, dtype=float) * dx
        out[:3, 3] = self.positions[0]
        return out

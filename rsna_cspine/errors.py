"""The project's exception types. Every error names the file (or study) and the cause."""

from __future__ import annotations

from pathlib import Path


class CSpineError(Exception):
    """Base class of every error the project raises on bad input."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
        self.reason = message


class DicomSeriesError(CSpineError):
    """A DICOM file or series cannot be turned into a valid volume."""


class NiftiError(CSpineError):
    """A segmentation NIfTI is unreadable or cannot be aligned with its study."""


class LayoutError(CSpineError):
    """A Kaggle-layout CSV or folder is missing, malformed or inconsistent."""


class SubmissionError(CSpineError):
    """A submission or solution table is incomplete, duplicated or non-finite."""


class ConfigError(CSpineError):
    """A YAML config or command-line override names an unknown key or a bad value."""

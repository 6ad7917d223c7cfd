"""Fixtures shared by several test modules: the real files, tiny real models and a tiny Kaggle test set.

Builders that take arguments (``make_tiny_models``, ``make_tiny_dataset``, ``write_toy_cache``,
``toy_crop_dataset``, the DICOM factory) live in importable helper modules beside this file; the fixtures
here are the instances several modules share. Module scope: each test module gets its own copy, so a
test that changes one cannot reach another module's tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rsna_cspine.io.volume import Volume
from tests.paths import REAL_DATA
from tests.toy_pipeline import make_tiny_dataset, make_tiny_models


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` beside the repository; tests that need it are skipped where it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real test files not available ({REAL_DATA})")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_ct(real_data: Path) -> Volume:
    """The TotalSegmentator example CT (a real DICOM series), loaded by the project's loader."""
    from rsna_cspine.io.dicom import load_series

    return load_series(real_data / "totalsegmentator" / "example_ct_dicom", workers=1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder of tiny untrained real networks: one stage-1 model, one stage-2 fold."""
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kaggle-layout test set: five good studies, a folder of non-DICOM files and a missing folder."""
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))

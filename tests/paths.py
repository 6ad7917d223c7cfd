"""Where the test suite finds things: the repository, its shipped files and the real data beside it."""

from __future__ import annotations

from pathlib import Path

#: The repository root (the folder holding ``rsna_cspine/`` and ``tests/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The real files beside the repository (``../shared/data/real`` from its root); their tests skip without them.
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"
#: Configs written by the old schema, for the translation tests.
LEGACY_CONFIGS = REPO_ROOT / "tests" / "fixtures" / "legacy_configs"
#: The Kaggle submission notebook.
NOTEBOOK = REPO_ROOT / "notebooks" / "kaggle_submission.ipynb"

"""Stratified, seeded train / val / test split of an image index (holdout or k-fold)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from rsna_cspine.errors import ConfigError
from rsna_cspine.twod.config import TwoDSplitConfig

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_indices(targets: np.ndarray, cfg: TwoDSplitConfig, fold: int = 0, n_folds: int = 5,
                  seed: int = 42, groups: np.ndarray | None = None, _unit: str = "images") -> dict[str, np.ndarray]:
    """Row numbers of each split, every class in proportion in every split.

    With ``groups`` (the study of each row) the studies are split, not the rows: every image of a study
    lands in the same split, and the proportions hold for the studies (each counted with its class).

    The test split (``cfg.test_fraction``) is carved first and is the same for every fold; ``holdout``
    then takes ``cfg.val_fraction`` of all rows for validation, ``kfold`` makes fold ``fold`` of an
    ``n_folds``-way StratifiedKFold over the rest the validation split.

    Args:
        targets: class number of each row.
        cfg: split settings.
        fold: ``kfold``: the validation fold.
        n_folds: ``kfold``: number of folds of the non-test images.
        seed: shuffles the images before splitting (keep it fixed across folds).
        groups: study of each row, or None (every row its own study).

    Returns:
        ``{"train", "val", "test"}`` → sorted row numbers (``test`` may be empty).

    Raises:
        ConfigError: a class has too few images for the requested split.
    """
    targets = np.asarray(targets)
    if groups is not None and len(np.unique(groups)) < len(targets):
        studies, study_of_row = np.unique(np.asarray(groups), return_inverse=True)
        study_targets = np.zeros(len(studies), dtype=np.int64)
        np.maximum.at(study_targets, study_of_row, targets)  # one class per study (index_images checks it)
        by_study = split_indices(study_targets, cfg, fold, n_folds, seed, _unit="studies")
        return {name: np.flatnonzero(np.isin(study_of_row, chosen)) for name, chosen in by_study.items()}
    rows = np.arange(len(targets))
    counts = np.bincount(targets)
    try:
        if cfg.test_fraction > 0:
            rest, test = train_test_split(rows, test_size=cfg.test_fraction, stratify=targets, random_state=seed)
        else:
            rest, test = rows, rows[:0]
        if cfg.mode == "holdout":
            val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
            train, val = train_test_split(rest, test_size=val_share, stratify=targets[rest], random_state=seed)
        else:
            smallest = int(np.unique(targets[rest], return_counts=True)[1].min())
            if smallest < n_folds:
                # sklearn only warns here and leaves a class out of some validation folds.
                raise ValueError(f"the least populated class has {smallest} {_unit} for {n_folds} folds")
            folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            train_pos, val_pos = list(folds.split(rest, targets[rest]))[fold]
            train, val = rest[train_pos], rest[val_pos]
    except ValueError as exc:
        raise ConfigError(f"cannot split {len(rows)} {_unit} with class counts {counts.tolist()} this way ({exc})") from exc
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

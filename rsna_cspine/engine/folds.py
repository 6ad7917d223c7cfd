"""Study → fold assignment and the folder each fold's run writes to."""

from __future__ import annotations

from pathlib import Path


def fold_of(studies: list[str], n_folds: int, seed: int = 42) -> dict[str, int]:
    """Deterministic study → fold assignment (sklearn GroupKFold semantics: a study is never split).

    Args:
        studies: study UIDs (duplicates allowed; a study keeps one fold).
        n_folds: number of folds.
        seed: shuffles the groups so folds do not follow UID order.
    """
    from sklearn.model_selection import GroupKFold

    unique = sorted(set(studies))
    folds: dict[str, int] = {}
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(unique, groups=unique)):
        for i in val_idx:
            folds[unique[i]] = k
    return folds


def fold_run_dir(run_dir: str | Path, fold: int | None) -> Path:
    """The folder one fold's run writes to: ``run_dir/fold{K}``, ``run_dir/all`` for fold -1 (every study,
    no validation), ``run_dir`` itself for a run without folds (``fold=None``, e.g. a 2D holdout split).

    Args:
        run_dir: the experiment folder (out-of-fold files and reports of all folds go here).
        fold: the validation fold, -1, or None.
    """
    run_dir = Path(run_dir)
    if fold is None:
        return run_dir
    return run_dir / ("all" if fold < 0 else f"fold{fold}")

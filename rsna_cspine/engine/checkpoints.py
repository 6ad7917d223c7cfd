"""Checkpoints that carry everything a resumed run needs (weights, optimiser, scheduler, AMP scaler,
epoch, best score, every RNG state) and everything a predictor needs (the resolved config)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsna_cspine.engine.distributed import unwrap_model
from rsna_cspine.errors import CSpineError, LayoutError
from rsna_cspine.io.files import atomic_open


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    best_score: float | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to resume or to predict, atomically (tmp file, then rename).

    Args:
        path: destination ``.pt`` file.
        model: the (possibly DDP-wrapped) model; the bare module's weights are stored.
        optimizer: optimiser whose state is stored for ``--resume``.
        scheduler: LR scheduler (torch or timm) with ``state_dict``.
        scaler: AMP GradScaler.
        epoch: number of completed epochs.
        best_score: best validation score so far (for early stopping after resume).
        config: the resolved run config, so a checkpoint alone can rebuild its model.
        extra: anything else (early-stopping counters, class names, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_score": best_score,
        "config": config,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        path: the ``.pt`` file.
        model: receives the weights (bare or DDP-wrapped).
        optimizer: receives its state when the checkpoint has one.
        scheduler: receives its state when the checkpoint has one.
        scaler: receives its state when the checkpoint has one.
        restore_rng: also restore python/numpy/torch RNG states (``--resume``).
        map_location: where tensors are loaded.

    Returns:
        The raw checkpoint dictionary (epoch, best_score, config, extra, ...).
    """

    path = Path(path)
    if not path.is_file():
        raise CSpineError("checkpoint not found", path)
    try:
        # weights_only=False: our own files carry numpy RNG state and configs, not just tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CSpineError(f"unreadable checkpoint ({exc.__class__.__name__}: {exc})", path) from exc
    if model is not None:
        unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        restore_rng_state(state["rng"])
    return state


def find_checkpoints(models_dir: str | Path, stage: str) -> list[Path]:
    """Checkpoints of one stage in a models folder, in a stable (sorted) order.

    Args:
        models_dir: the models folder.
        stage: ``seg`` or ``cls``.

    Returns:
        ``<models>/<stage>/**/best.pt`` and ``<models>/<stage>/*.pt`` (never ``last.pt``), sorted by path.
    """
    folder = Path(models_dir) / stage
    if not folder.is_dir():
        raise LayoutError(f"no '{stage}' folder (expected {stage}/**/best.pt or {stage}/*.pt)", Path(models_dir))
    found = set(folder.rglob("best.pt")) | {p for p in folder.glob("*.pt") if p.name != "last.pt"}
    found = {p for p in found if p.is_file()}
    if not found:
        raise LayoutError(f"no checkpoint: expected {stage}/**/best.pt or {stage}/*.pt", folder)
    return sorted(found)

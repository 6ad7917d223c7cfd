"""Training machinery shared by every trainer (stage 1, stage 2, 2D mode), one module per job.

``devices`` (seeds, thread count, device, mixed precision), ``distributed`` (torchrun process group, DDP wrapper,
collectives), ``checkpoints`` (save/load with RNG states), ``runlog`` (run folder, ``summary.csv``,
curves), ``schedules`` (early stopping, time budget, weight average) and ``folds`` (study → fold, a
fold's run folder). The public names are importable from ``rsna_cspine.engine`` directly.
"""

from rsna_cspine.engine.checkpoints import (
    capture_rng_state,
    find_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from rsna_cspine.engine.devices import (
    amp_dtype,
    autocast,
    cpu_has_native_bf16,
    make_grad_scaler,
    resolve_device,
    seed_everything,
    torch_threads,
    training_autocast,
)
from rsna_cspine.engine.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    backend_for,
    barrier,
    cleanup_distributed,
    init_distributed,
    run_seeded_distributed,
    under_torchrun,
    unwrap_model,
    wrap_model,
)
from rsna_cspine.engine.folds import fold_of, fold_run_dir
from rsna_cspine.engine.runlog import SummaryLog, prepare_run_dir
from rsna_cspine.engine.schedules import EarlyStopping, TimeBudget, make_model_ema

__all__ = [
    "DistContext",
    "EarlyStopping",
    "SummaryLog",
    "TimeBudget",
    "all_reduce_mean",
    "amp_dtype",
    "any_rank",
    "autocast",
    "training_autocast",
    "cpu_has_native_bf16",
    "backend_for",
    "barrier",
    "capture_rng_state",
    "find_checkpoints",
    "cleanup_distributed",
    "fold_of",
    "fold_run_dir",
    "init_distributed",
    "load_checkpoint",
    "make_grad_scaler",
    "make_model_ema",
    "prepare_run_dir",
    "resolve_device",
    "restore_rng_state",
    "run_seeded_distributed",
    "save_checkpoint",
    "seed_everything",
    "torch_threads",
    "under_torchrun",
    "unwrap_model",
    "wrap_model",
]

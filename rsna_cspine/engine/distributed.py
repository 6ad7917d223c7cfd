"""torchrun support: the process group, the model wrapper and the few collectives the trainers issue.

The group is created as ``cpu:gloo,cuda:nccl`` on GPU (plain ``gloo`` on CPU). DistributedDataParallel's
gradient buckets and SyncBatchNorm are CUDA tensors and go through NCCL; every collective this project
issues itself (the mean of a loss or a clock, whether any rank wants to stop, barriers) reduces a small
CPU tensor, which the gloo half serves on every backend. (A group of NCCL alone cannot reduce a CPU
tensor: the first such collective would raise.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from rsna_cspine.engine.devices import resolve_device, seed_everything, torch_threads

#: Process-group backend per device type of the training device.
GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"

_T = TypeVar("_T")


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (world_size 1 when run plainly).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this machine (the GPU index).
        backend: the process group's backend string ("" without a group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """The process-group backend for a training device: see the module docstring."""
    return GPU_BACKEND if device.type == "cuda" else CPU_BACKEND


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set).

    Args:
        device: the device this process trains on; decides the backend (:func:`backend_for`).
    """
    if not under_torchrun():
        return DistContext()
    import torch.distributed as dist

    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when in a process group, the plain module otherwise.

    On GPU, BatchNorm layers become SyncBatchNorm so that running statistics are computed over the global
    batch and stay identical on every rank (per-rank batches are small for 3D and 2.5D inputs). PyTorch's
    SyncBatchNorm is GPU-only, so on CPU (gloo) the running statistics stay rank-local; rank 0's are saved.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_reduce(values: list[float], op: str) -> torch.Tensor:
    """Reduce a few numbers over ranks as a CPU float64 tensor (served by gloo on every backend)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device="cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Average a python scalar over ranks (identity without a process group)."""
    if not ctx.enabled:
        return value
    return float(_all_reduce([value], "sum").item() / ctx.world_size)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is True on at least one; keeps per-rank decisions (a time budget
    measured by each rank's own clock) from splitting the group, which would hang the next collective."""
    if not ctx.enabled:
        return flag
    return bool(_all_reduce([1.0 if flag else 0.0], "max").item() > 0)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank. A CPU all-reduce rather than ``dist.barrier()``: the latter would pick the
    NCCL half of a ``cpu:gloo,cuda:nccl`` group and its device guess."""
    if ctx.enabled:
        _all_reduce([0.0], "sum")


def run_seeded_distributed(
    body: Callable[[torch.device, DistContext], _T], *, device: str, seed: int, threads: int = 0
) -> _T:
    """Set threads (for the call only) and seeds, resolve the device, join the process group (under
    torchrun), run ``body``.

    Args:
        body: the training function, called with the device and the distributed context.
        device: "auto", "cpu", "cuda", ...
        seed: global seed.
        threads: torch intra-op threads while ``body`` runs (0 keeps torch's default).
    """
    with torch_threads(threads):
        seed_everything(seed)
        resolved = resolve_device(device)
        ctx = init_distributed(resolved)
        try:
            return body(resolved, ctx)
        finally:
            cleanup_distributed(ctx)

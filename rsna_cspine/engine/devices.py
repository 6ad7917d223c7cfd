"""Seeds, torch's thread count, the training device and its mixed precision.

``amp_dtype`` is the one place that decides which reduced precision a device runs: bfloat16 only where
the hardware has it natively, float16 (with an active ``GradScaler``) on older GPUs, nothing on CPU unless
bfloat16 is asked for explicitly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from monai.utils import set_determinism

#: CUDA compute capability from which bfloat16 runs natively (Ampere, sm_80).
NATIVE_BF16_CAPABILITY: tuple[int, int] = (8, 0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) and ask cuDNN for deterministic kernels.

    MONAI's ``set_determinism`` does exactly this (each generator gets ``seed % 2**32``; cuDNN
    ``deterministic=True, benchmark=False``, which trades some GPU speed for run-to-run identical results).

    Args:
        seed: the run's seed.
    """
    set_determinism(seed=seed)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the duration (0 keeps them), then put back: a training
    run on one thread must not leave the caller, e.g. the demo's prediction after it, on one thread.

    Args:
        threads: intra-op threads while inside (0 = unchanged).
    """
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the local CUDA device when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def amp_dtype(device: torch.device, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for full precision.

    ``torch.cuda.is_bf16_supported()`` also answers yes where bfloat16 is only emulated (P100, T4), which
    is slower than float16 and, without a ``GradScaler``, loses small gradients; so the compute
    capability decides here.

    Args:
        device: the device the model runs on.
        cpu_bf16: on CPU, use bfloat16 (only worth it where the CPU computes it natively).

    Returns:
        ``torch.bfloat16`` on GPUs of compute capability ≥ 8.0, ``torch.float16`` on older GPUs (pair it
        with :func:`make_grad_scaler`), ``torch.bfloat16`` on CPU when ``cpu_bf16``, else None.
    """
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def training_autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """Mixed precision of a training or validation pass: :func:`autocast`, with bfloat16 on a CPU that computes
    it natively (:func:`cpu_has_native_bf16`; about 1.6× faster steps for the CPU stage-2 model, weights and
    optimiser state stay float32) and full precision on other CPUs, where emulated bfloat16 is slower.

    Args:
        device: where the forward pass runs.
        enabled: the run's ``train.amp``.
    """
    return autocast(device, enabled, cpu_bf16=device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, enabled: bool, cpu_bf16: bool = False) -> AbstractContextManager:
    """Mixed precision in :func:`amp_dtype`'s dtype when ``enabled``; a no-op where it gives None.

    Args:
        device: where the forward pass runs.
        enabled: the run's ``amp`` setting.
        cpu_bf16: see :func:`amp_dtype`.
    """
    dtype = amp_dtype(device, cpu_bf16) if enabled else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active exactly when :func:`autocast` runs float16 (bfloat16 and fp32 need none).

    Args:
        device: the training device.
        enabled: the run's ``amp`` setting.
    """
    use = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=use)

"""Loaders and the inference loop shared by the stages whose items are images or stacks of images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from rsna_cspine.engine.devices import training_autocast
from rsna_cspine.engine.distributed import DistContext


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int, ctx: DistContext) -> DataLoader:
    """One epoch's shuffled training loader; its order depends only on ``(seed, epoch)`` (and the rank).

    A dataset with ``set_epoch`` is told the epoch first, so its augmentation can depend on it. Under
    torchrun each rank takes its share of the same shuffled order (``DistributedSampler``).

    Args:
        dataset: training items.
        batch_size: items per step and process.
        seed: run seed.
        epoch: 0-based epoch.
        num_workers: loader processes.
        ctx: the torchrun context.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed + epoch)
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        drop_last=len(dataset) > batch_size * max(ctx.world_size, 1),  # type: ignore[arg-type]
        pin_memory=torch.cuda.is_available(),
    )


@torch.inference_mode()
def predict_batches(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    amp: bool,
    inputs: Callable[[dict[str, torch.Tensor], torch.device], tuple[torch.Tensor, ...]],
    to_probs: Callable[[Any], torch.Tensor],
    num_workers: int = 0,
) -> np.ndarray:
    """Probabilities of every item of a dataset, in item order (the validation and report loop).

    Args:
        model: the classifier (put in eval mode here).
        dataset: items (no augmentation).
        batch_size: items per forward pass.
        device: where the model is.
        amp: mixed precision (``engine.training_autocast``: on GPU, and on CPUs with native bfloat16).
        inputs: one batch → the model's positional inputs on ``device`` (the task's ``inputs``).
        to_probs: one batch's model outputs → ``(B,)`` or ``(B, K)`` probabilities.
        num_workers: DataLoader workers.

    Returns:
        float64, one row per item (empty when the dataset is).
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs: list[np.ndarray] = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=None):
        with training_autocast(device, amp):
            out = model(*inputs(batch, device))
        probs.append(to_probs(out).float().cpu().numpy().astype(np.float64))
    return np.concatenate(probs) if probs else np.zeros(0)

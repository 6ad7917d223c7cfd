"""Toy stage-1 studies at grid resolution, a tiny stage-1 run config (training and DDP tests) and a stand-in
network whose answer is known (prediction tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsna_cspine.seg.config import SegAugmentConfig, SegConfig, SegDataConfig, SegModelConfig, SegTrainConfig
from rsna_cspine.seg.preprocess import write_cache_file
from rsna_cspine.training.config import OptimConfig

GRID = (32, 32, 32)


class IntensityBands(torch.nn.Module):
    """A stand-in network whose answer is known: class k wherever the windowed intensity is k / 10."""

    def __init__(self, n_classes: int = 8) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(n_classes, dtype=torch.float32) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.centres.view(1, -1, 1, 1, 1)) ** 2) * 1000


def toy_labels(rng: np.random.Generator, shape: tuple[int, int, int] = GRID) -> np.ndarray:
    """Seven stacked ellipsoids (C1 on top) and one thoracic one below, at a random offset."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    labels = np.zeros(shape, np.uint8)
    top = rng.uniform(1, 3)
    height = (shape[0] - top - 1) / 8
    cy, cx = shape[1] / 2 + rng.uniform(-3, 3), shape[2] / 2 + rng.uniform(-3, 3)
    for k in range(8):
        zc, radius = top + (k + 0.5) * height, 5 + 0.4 * k
        inside = ((z - zc) / (0.45 * height)) ** 2 + ((y - cy) / radius) ** 2 + ((x - cx) / radius) ** 2 <= 1
        labels[inside] = k + 1
    return labels


def write_toy_cache(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` stage-1 cache files of toy studies: bright ellipsoids (the vertebrae) on a dim noisy background."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        labels = toy_labels(rng)
        image = (0.1 + 0.4 * (labels > 0) + rng.normal(0, 0.05, GRID)).astype(np.float32)[None]
        paths.append(write_cache_file(folder / f"toy{i}.npz", image, labels, GRID, (1.0, 1.0, 1.0)))
    return paths


def tiny_seg_config(run_dir: Path, epochs: int, **train: float) -> SegConfig:
    """A 32³ UNet run on CPU that learns the toy studies in a few epochs; ``train`` sets ``train:`` fields."""
    return SegConfig(
        run_dir=str(run_dir),
        device="cpu",
        seed=7,
        data=SegDataConfig(grid=GRID),
        model=SegModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
        aug=SegAugmentConfig(affine_prob=0.5, noise_prob=0.5),
        train=SegTrainConfig(epochs=epochs, batch_size=2, patience=0, **train),
        optim=OptimConfig(lr=5e-3, weight_decay=1e-5, warmup_epochs=0),
    )

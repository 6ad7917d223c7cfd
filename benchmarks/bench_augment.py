"""Stack augmentation speed: the project's ``StackAugment`` against the same augmentation built from MONAI.

``training.augment.StackAugment`` composes random resized crop, flips, rotation and shift into one affine
map and resamples every plane of a stack with a single ``grid_sample``, then changes contrast (about the
mean) and brightness of the image planes in place. The MONAI chain does the same jobs with the library's
transforms on the stack's planes as channels: ``RandAffine`` (rotation, shift, zoom and the resize to the
output size; ``cache_grid=True``, its fastest setting), two ``RandFlip``, ``RandScaleIntensityFixedMean``
and ``RandShiftIntensity`` on the image planes, then the clip to [0, 1]. Both are seeded per item as the
data loaders do (StackAugment: torch's generator inside ``fork_rng``; MONAI: ``set_random_state``), and
that seeding is timed with them.

Rounds are interleaved (StackAugment, MONAI, MONAI, StackAugment, ...) in one process, so machine load
hits both alike; the medians of the per-round mean time per stack are reported, one intra-op thread
(the loaders' worker processes run one each).

    .venv/bin/python benchmarks/bench_augment.py              # 15 rounds of 20 stacks per shape
    .venv/bin/python benchmarks/bench_augment.py --quick      # 3 rounds of 5 stacks
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

import common

#: (name, stack shape (N, C, H, W), image planes per slice, output size): the shipped configs' stacks.
SHAPES: tuple[tuple[str, tuple[int, int, int, int], int, int], ...] = (
    ("stage 2, configs/cls_cpu.yaml (8 slices x 11 planes, 80 px)", (8, 11, 80, 80), 10, 80),
    ("stage 2, configs/cls_resnet50.yaml (15 slices x 5 planes, 224 px)", (15, 5, 224, 224), 5, 224),
    ("2D, configs/twod_cpu.yaml (1 plane, 64 px)", (1, 1, 64, 64), 1, 64),
    ("2D, configs/twod_convnext_tiny.yaml (3 planes, 224 px)", (1, 3, 224, 224), 3, 224),
)


class MonaiStackAugment:
    """The StackAugment settings as a MONAI chain (same jobs; MONAI's own parameter distributions).

    Args:
        cfg: the augmentation settings (``training.config.ImageAugConfig``).
        size: output height and width.
        image_channels: leading planes per slice that are CT intensities (the rest only move).
    """

    def __init__(self, cfg, size: int, image_channels: int) -> None:
        from monai.transforms import (
            Compose,
            RandAffine,
            RandFlip,
            RandScaleIntensityFixedMean,
            RandShiftIntensity,
        )

        zoom = 1.0 - math.sqrt(cfg.scale_min)  # a crop of scale_min of the area is a zoom of sqrt(scale_min)
        self.geometry = Compose([
            RandAffine(prob=1.0, rotate_range=(math.radians(cfg.rotate_deg),), scale_range=(zoom, zoom),
                       translate_range=(cfg.translate * size, cfg.translate * size), spatial_size=(size, size),
                       mode="bilinear", padding_mode="zeros", cache_grid=True),
            RandFlip(prob=cfg.hflip, spatial_axis=1),
            RandFlip(prob=cfg.vflip, spatial_axis=0),
        ])
        self.intensity = Compose([
            RandScaleIntensityFixedMean(prob=1.0, factors=cfg.contrast),
            RandShiftIntensity(offsets=cfg.brightness, prob=1.0),
        ])
        self.size = size
        self.image_channels = image_channels

    def __call__(self, stack: torch.Tensor, seed: int) -> torch.Tensor:
        from monai.data import MetaTensor

        self.geometry.set_random_state(seed)
        self.intensity.set_random_state(seed + 1)
        n, c, h, w = stack.shape
        out = self.geometry(stack.reshape(n * c, h, w))
        out = (out.as_tensor() if isinstance(out, MetaTensor) else out).reshape(n, c, self.size, self.size)
        images = self.intensity(out[:, : self.image_channels].reshape(-1, self.size, self.size))
        images = images.as_tensor() if isinstance(images, MetaTensor) else images
        out[:, : self.image_channels] = images.reshape(n, self.image_channels, self.size, self.size).clamp(0.0, 1.0)
        return out


def time_project(augment, stacks: list[torch.Tensor], seeds: list[int]) -> float:
    """Mean seconds per stack of StackAugment, seeded per item as the datasets do."""
    start = time.perf_counter()
    for stack, seed in zip(stacks, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            augment(stack)
    return (time.perf_counter() - start) / len(stacks)


def time_monai(augment: MonaiStackAugment, stacks: list[torch.Tensor], seeds: list[int]) -> float:
    """Mean seconds per stack of the MONAI chain, seeded per item."""
    start = time.perf_counter()
    for stack, seed in zip(stacks, seeds):
        augment(stack, seed)
    return (time.perf_counter() - start) / len(stacks)


def bench_shape(shape: tuple[int, int, int, int], image_channels: int, size: int, rounds: int, items: int) -> dict:
    """Interleaved rounds of both augmentations on one stack shape; medians of the per-round means."""
    from rsna_cspine.cls.config import ClsAugConfig
    from rsna_cspine.training.augment import StackAugment

    cfg = ClsAugConfig(scale_min=0.85, hflip=0.5, vflip=0.5, rotate_deg=10.0, translate=0.05, brightness=0.05,
                       contrast=0.1)
    project, monai = StackAugment(cfg, size, image_channels), MonaiStackAugment(cfg, size, image_channels)
    rng = np.random.default_rng(0)
    stacks = [torch.from_numpy(rng.random(shape, dtype=np.float32)) for _ in range(items)]
    seeds = [int(s) for s in rng.integers(0, 2**31, size=items)]
    for out in (project(stacks[0].clone()), monai(stacks[0].clone(), seeds[0])):  # warm-up, and a shape check
        assert out.shape == (shape[0], shape[1], size, size) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    project_s, monai_s = [], []
    for r in range(rounds):
        order = [("project", time_project, project), ("monai", time_monai, monai)]
        for name, timer, augment in order if r % 2 == 0 else order[::-1]:
            (project_s if name == "project" else monai_s).append(timer(augment, stacks, seeds))
    return {
        "shape": list(shape), "image_channels": image_channels, "size": size, "rounds": rounds, "items": items,
        "project_ms": [1e3 * s for s in project_s], "monai_ms": [1e3 * s for s in monai_s],
        "project_median_ms": 1e3 * statistics.median(project_s), "monai_median_ms": 1e3 * statistics.median(monai_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape (median reported)")
    parser.add_argument("--items", type=int, default=20, help="stacks per round")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 5 stacks")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.items = 3, 5
    torch.set_num_threads(1)
    info = common.machine_info(torch_threads=1)
    command = common.command_line()
    results, rows = {}, []
    for name, shape, image_channels, size in SHAPES:
        print(f"timing {name}", flush=True)
        result = bench_shape(shape, image_channels, size, args.rounds, args.items)
        results[name] = result
        ratio = result["monai_median_ms"] / result["project_median_ms"]
        rows.append([name, common.fmt(result["project_median_ms"]), common.fmt(result["monai_median_ms"]),
                     f"×{ratio:.2f}"])
    title = (f"### Stack augmentation, ms per stack ({args.rounds} interleaved rounds of {args.items} stacks, "
             "median of the round means, 1 thread)\n\n")
    table = common.markdown_table(["stack", "StackAugment", "MONAI chain", "MONAI / StackAugment"], rows)
    common.save_results("augment", info, command, title + table, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

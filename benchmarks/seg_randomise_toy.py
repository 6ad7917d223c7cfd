"""Does stage-1 domain randomisation teach shape rather than brightness? A one-minute toy check.

Trains the stage-1 loop twice on the same toy studies (seven stacked ellipsoids, "bone" at 600 HU in
"soft tissue" at 50 HU, the HU window of the configs), once with ``augment.randomise`` off and once on,
with the same seed and epochs, and scores both on held-out toy studies of normal contrast and of
inverted contrast (bone at −100 HU, darker than the soft tissue at 600 HU). Reports the mean Dice
over C1..C7 and the binary Dice of "any vertebra". A model that learnt "bright = vertebra" scores ≈ 0 on
the inverted set::

    .venv/bin/python benchmarks/seg_randomise_toy.py --epochs 80 --studies 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: The configs' HU window, and the toy's tissue HU.
WINDOW = (-400.0, 1600.0)
NORMAL = {"bone": 600.0, "soft": 50.0}
INVERTED = {"bone": -100.0, "soft": 600.0}
GRID = (32, 32, 32)


def toy_study(rng: np.random.Generator, contrast: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Seven stacked ellipsoids (C1 on top) at a random offset; image in window units (1, D, H, W)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij")
    labels = np.zeros(GRID, np.uint8)
    top = rng.uniform(1, 3)
    height = (GRID[0] - top - 1) / 8
    cy, cx = GRID[1] / 2 + rng.uniform(-3, 3), GRID[2] / 2 + rng.uniform(-3, 3)
    for k in range(7):
        zc, radius = top + (k + 0.5) * height, 5 + 0.4 * k
        labels[((z - zc) / (0.45 * height)) ** 2 + ((y - cy) / radius) ** 2 + ((x - cx) / radius) ** 2 <= 1] = k + 1
    hu = np.where(labels > 0, contrast["bone"], contrast["soft"]) + rng.normal(0.0, 60.0, GRID)
    image = (np.clip(hu, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    return image.astype(np.float32)[None], labels


def dice_scores(model: torch.nn.Module, studies: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(mean Dice over C1..C7, binary Dice of any vertebra) averaged over studies."""
    model.eval()
    per_level, binary = [], []
    with torch.no_grad():
        for image, labels in studies:
            pred = model(torch.as_tensor(image)[None]).argmax(1)[0].numpy()
            per_level.append(np.mean([2 * ((pred == k) & (labels == k)).sum()
                                      / max(1, (pred == k).sum() + (labels == k).sum()) for k in range(1, 8)]))
            binary.append(2 * ((pred > 0) & (labels > 0)).sum() / max(1, (pred > 0).sum() + (labels > 0).sum()))
    return float(np.mean(per_level)), float(np.mean(binary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--studies", type=int, default=8, help="toy training studies")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10 epochs, 4 studies (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.studies = 10, 4

    from rsna_cspine.seg.config import SegAugmentConfig, SegConfig, SegDataConfig, SegModelConfig, SegTrainConfig
    from rsna_cspine.seg.model import build_model
    from rsna_cspine.seg.preprocess import write_cache_file
    from rsna_cspine.seg.train import fit_segmentation

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    train = [toy_study(rng, NORMAL) for _ in range(args.studies + 2)]
    held = np.random.default_rng(args.seed + 1)
    normal = [toy_study(held, NORMAL) for _ in range(6)]
    held = np.random.default_rng(args.seed + 1)
    inverted = [toy_study(held, INVERTED) for _ in range(6)]  # the same shapes, inverted contrast
    print(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print("| randomise | train s | Dice C1–C7 normal | binary normal | Dice C1–C7 inverted | binary inverted |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_cache_file(Path(tmp) / f"t{i}.npz", image, labels, GRID, (1.0, 1.0, 1.0), WINDOW)
                 for i, (image, labels) in enumerate(train)]
        for randomise in (False, True):
            cfg = SegConfig(run_dir=str(Path(tmp) / f"run_{randomise}"), device="cpu", seed=args.seed,
                            data=SegDataConfig(grid=GRID, hu_window=WINDOW),
                            model=SegModelConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=0),
                            augment=SegAugmentConfig(randomise=randomise),
                            train=SegTrainConfig(epochs=args.epochs, batch_size=2, lr=5e-3, warmup_epochs=0,
                                                 patience=0, val_every=args.epochs, amp=False))
            t0 = time.perf_counter()
            run = fit_segmentation(cfg, paths[:-2], paths[-2:], progress=False)
            seconds = time.perf_counter() - t0
            model = build_model(cfg.model, 8)
            model.load_state_dict(torch.load(run / "last.pt", weights_only=False)["model"])
            scores = dice_scores(model, normal) + dice_scores(model, inverted)
            print(f"| {randomise} | {seconds:.0f} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1 as a :class:`~rsna_cspine.training.loop.TrainingTask`: cached studies → MONAI network → Dice + CE,
validated by the mean Dice of C1–C7 at grid resolution (the localiser: of the cervical spine), in the
sliding windows that prediction uses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.engine.devices import autocast
from rsna_cspine.engine.distributed import DistContext
from rsna_cspine.seg.config import SegConfig, SegPredictConfig
from rsna_cspine.seg.data import build_transforms, make_dataset, make_loader
from rsna_cspine.seg.model import build_model, grid_divisor, window_logits
from rsna_cspine.training.loop import TrainingTask


def class_names(thoracic: str, source: str = "grid") -> list[str]:
    """Names of the foreground classes in channel order (C1..C7 [+ thoracic]; the localiser's one class).

    Args:
        thoracic: label folding (see ``preprocess.fold_labels``).
        source: the network's input (``data.INPUTS``).
    """
    if source == "localiser":
        return ["cervical"]
    return list(VERTEBRAE) + (["thoracic"] if thoracic == "class" else [])


def make_loss(cfg: SegConfig) -> DiceCELoss:
    """Dice + cross-entropy over softmax outputs, labels given as class indices.

    The Dice term is the batch's (sums over every item of the batch, as nnU-Net's batch Dice): a training
    patch holds only some of the seven vertebrae, and a per-item Dice of a class absent from the patch
    is 0 or 1 on a handful of voxels, which made the held-out Dice lower and the validation curve noisier
    (benchmarks/results/evidence.md, "Stage 1 cascade").
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.train.lambda_dice, lambda_ce=cfg.train.lambda_ce,
                      batch=True)


@torch.inference_mode()
def validate(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: torch.nn.Module,
    device: torch.device,
    n_classes: int,
    *,
    amp: bool,
    windows: SegPredictConfig,
    grid: Sequence[int],
    progress: bool = True,
) -> tuple[float, np.ndarray]:
    """Validation loss and Dice per foreground class at grid resolution (NaN where a class is absent).

    Args:
        model: network (set to eval here).
        loader: validation batches.
        loss_fn: Dice+CE loss.
        device: where to compute.
        n_classes: network output channels.
        amp: mixed precision on GPU.
        windows: the predict section: the network runs in its sliding windows (``model.window_logits``).
        grid: the grid the network trains on.
        progress: tqdm bar.
    """
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    losses: list[float] = []
    for batch in tqdm(loader, desc="val", leave=False, disable=None if progress else True):
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        with autocast(device, amp):
            logits = window_logits(model, image, windows, grid)
        losses.append(float(loss_fn(logits.float(), label)))
        pred = one_hot(logits.max(1, keepdim=True).indices, n_classes)  # argmax(1) is ~10x slower on CPU
        metric(y_pred=pred, y=one_hot(label.long(), n_classes))
    dice = metric.aggregate().cpu().numpy().astype(np.float64)
    return float(np.mean(losses)) if losses else float("nan"), dice


class SegmentationTask(TrainingTask):
    """One fold of stage 1 over cached studies: the vertebra network, or the cascade's localiser.

    Args:
        cfg: the resolved run config (the localiser's own, ``localise.localiser_config``, for it).
        train_paths: cache files to train on.
        val_paths: cache files to validate on (empty: every epoch's weights are kept as best).
        device: the training device.
        extra: facts stored in every checkpoint (e.g. the study split, the localiser).
        progress: tqdm bar of the validation pass.
        source: the cached input trained on (``data.INPUTS``): ``grid`` (whole study on the grid),
            ``fine`` (the cascade's box around the neck) or ``localiser`` (cervical spine vs the rest).
    """

    monitor = "val_dice_mean"
    mode = "max"

    def __init__(self, cfg: SegConfig, train_paths: Sequence[Path], val_paths: Sequence[Path], device: torch.device,
                 extra: dict[str, Any] | None = None, progress: bool = True, source: str = "grid") -> None:
        self.cfg, self.device, self.extra, self.progress = cfg, device, dict(extra or {}), progress
        self.names = class_names(cfg.data.thoracic, source)
        self.n_classes = len(self.names) + 1
        d, t = cfg.data, cfg.train
        self.model = build_model(cfg.model, self.n_classes).to(device)
        self.loss_fn = make_loss(cfg)
        common = {"hu_window": d.hu_window, "source": source, "divisor": grid_divisor(cfg.model)}
        train_tf = build_transforms(cfg.aug, d.grid, d.thoracic, train=True, patch_size=t.patch_size,
                                    patch_foreground=t.patch_foreground, **common)
        self.train_set = make_dataset(train_paths, train_tf)
        self.val_set = make_dataset(val_paths, build_transforms(cfg.aug, d.grid, d.thoracic, train=False, **common))
        self.has_validation = bool(val_paths)

    def train_loader(self, epoch: int, ctx: DistContext) -> torch.utils.data.DataLoader:
        t = self.cfg.train
        return make_loader(self.train_set, batch_size=t.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                           num_workers=t.num_workers, rank=ctx.rank, world_size=ctx.world_size)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(outputs.float(), batch["label"].to(self.device, non_blocking=True))

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        # Every rank scores the whole validation set so that best/early-stop decisions agree.
        t = self.cfg.train
        loader = make_loader(self.val_set, batch_size=t.val_batch_size, shuffle=False, seed=self.cfg.seed, epoch=0,
                             num_workers=t.num_workers)
        val_loss, dice = validate(model, loader, self.loss_fn, self.device, self.n_classes, amp=t.amp,
                                  windows=self.cfg.predict, grid=self.cfg.data.grid, progress=self.progress)
        vertebra_dice = dice[: len(VERTEBRAE)] if self.names[0] == VERTEBRAE[0] else dice[:1]
        score = float(np.nanmean(vertebra_dice)) if np.isfinite(vertebra_dice).any() else 0.0
        return {"val_loss": val_loss, "val_dice_mean": score, **{f"val_dice_{n}": float(v) for n, v in zip(self.names, dice)}}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"classes": self.names, **self.extra}

"""``train-2d-seg``: the column U-Net of the sagittal-CT thesis, trained through the one training loop.

Image / mask pairs (``synth-sagittal`` or ``import-sagittal`` output, or ``images/`` + ``masks/`` folders)
are split by study, augmented together (the mask moves with the image and is never brightened), and a
MONAI 2D UNet learns background vs column with Dice + cross-entropy; ``best.pt`` is the epoch with the best
validation Dice of the column. ``data.mask_with`` of the 2D classifier then takes that checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import GroupShuffleSplit
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rsna_cspine.engine.devices import autocast
from rsna_cspine.engine.distributed import DistContext, barrier, run_seeded_distributed
from rsna_cspine.engine.runlog import prepare_run_dir
from rsna_cspine.errors import LayoutError
from rsna_cspine.training.augment import StackAugment, item_seed
from rsna_cspine.training.batches import epoch_loader
from rsna_cspine.training.loop import TrainingTask, fit
from rsna_cspine.twod.data import IMAGE_SUFFIXES, read_image
from rsna_cspine.twod.masking import build_column_unet
from rsna_cspine.twod.seg_config import TwoDSegConfig

log = logging.getLogger(__name__)


def index_pairs(source: str | Path) -> pd.DataFrame:
    """Image / mask pairs with their study: ``path``, ``mask`` (absolute) and ``study``.

    Args:
        source: a CSV with ``path`` and ``mask`` columns (relative to it; ``study`` optional), or a folder
            holding ``images/`` and ``masks/`` with the same relative file names (study: the first folder
            below ``images/``, else the file).

    Raises:
        LayoutError: missing source, columns or files.
    """
    source = Path(source)
    if source.is_file():
        try:
            frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise LayoutError(f"not a readable CSV ({exc})", source) from exc
        missing = [c for c in ("path", "mask") if c not in frame.columns]
        if missing:
            raise LayoutError(f"missing column(s) {missing}; found {list(frame.columns)}", source)
        base = source.resolve().parent
        for column in ("path", "mask"):
            frame[column] = [str(p if p.is_absolute() else base / p) for p in map(Path, frame[column].str.strip())]
        frame["study"] = frame["study"] if "study" in frame.columns else frame["path"]
    elif (source / "images").is_dir() and (source / "masks").is_dir():
        images = sorted(p for p in (source / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        rows = []
        for image in images:
            relative = image.relative_to(source / "images")
            study = relative.parts[0] if len(relative.parts) > 1 else relative.as_posix()
            rows.append((str(image), str(source / "masks" / relative), study))
        frame = pd.DataFrame(rows, columns=["path", "mask", "study"])
    else:
        raise LayoutError("expected a CSV of path,mask or a folder with images/ and masks/", source)
    absent = [p for column in ("path", "mask") for p in frame[column] if not Path(p).is_file()]
    if absent or frame.empty:
        raise LayoutError(f"{len(absent)} listed file(s) do not exist, e.g. {absent[:3]}" if absent else "no pairs",
                          source)
    return frame[["path", "mask", "study"]].reset_index(drop=True)


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """A mask image (any non-zero pixel = column) as ``(size, size)`` float32 0/1 (nearest-neighbour resize)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L")) > 0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise LayoutError(f"unreadable mask ({exc})", path) from exc
    tensor = torch.from_numpy(array.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].numpy()


class PairDataset(Dataset):
    """Pairs → ``{"image" (1, S, S), "label" (1, S, S) 0/1, "index"}``, augmented together when training.

    Args:
        frame: rows of :func:`index_pairs`.
        cfg: the run config (size, window, augmentation).
        train: augment (seeded per seed, epoch and item).
        pairs: already decoded ``(image, mask)`` arrays in row order, or None.
    """

    def __init__(self, frame: pd.DataFrame, cfg: TwoDSegConfig, train: bool,
                 pairs: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.frame, self.cfg, self.pairs = frame.reset_index(drop=True), cfg, pairs
        size = cfg.data.image_size
        self.augment = StackAugment(cfg.aug, size, image_channels=1) if train and cfg.aug.enabled else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.frame)

    def decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.cfg.data
        row = self.frame.iloc[index]
        return read_image(row["path"], 1, d.image_size, d.dicom_window), read_mask(row["mask"], d.image_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self.pairs[index] if self.pairs is not None else self.decode(index)
        stack = torch.from_numpy(np.concatenate([image, mask[None]]).astype(np.float32))[None]  # (1, 2, S, S)
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.cfg.seed, self.epoch, index))
                stack = self.augment(stack)
        return {"image": stack[0, :1].contiguous(), "label": (stack[0, 1:] > 0.5).float(), "index": torch.tensor(index)}


class ColumnSegTask(TrainingTask):
    """The column U-Net as a :class:`~rsna_cspine.training.loop.TrainingTask` (Dice + CE, val Dice of the column).

    Args:
        cfg: the run config.
        frames: ``train`` and ``val`` pair rows.
        pairs: decoded pairs per split (``in_memory``), or None.
        device: the training device.
    """

    monitor = "val_dice"
    mode = "max"

    def __init__(self, cfg: TwoDSegConfig, frames: dict[str, pd.DataFrame],
                 pairs: dict[str, list] | None, device: torch.device) -> None:
        self.cfg, self.frames, self.device = cfg, frames, device
        self.datasets = {name: PairDataset(frame, cfg, train=name == "train", pairs=(pairs or {}).get(name))
                         for name, frame in frames.items()}
        self.has_validation = len(frames["val"]) > 0
        self.model = build_column_unet(cfg.model).to(device)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.train.lambda_dice,
                                  lambda_ce=cfg.train.lambda_ce)

    def train_loader(self, epoch: int, ctx: DistContext) -> DataLoader:
        t = self.cfg.train
        return epoch_loader(self.datasets["train"], t.batch_size, self.cfg.seed, epoch, t.num_workers, ctx)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(outputs.float(), batch["label"].to(self.device, non_blocking=True))

    @torch.inference_mode()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        t = self.cfg.train
        metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
        losses = []
        loader = DataLoader(self.datasets["val"], batch_size=t.val_batch_size, shuffle=False, num_workers=t.num_workers)
        for batch in tqdm(loader, desc="val", leave=False, disable=None):
            label = batch["label"].to(self.device)
            with autocast(self.device, t.amp):
                logits = model(batch["image"].to(self.device))
            losses.append(float(self.loss_fn(logits.float(), label)) * len(label))
            metric(y_pred=one_hot(logits.argmax(1, keepdim=True), 2), y=one_hot(label.long(), 2))
        dice = float(metric.aggregate().item())
        return {"val_loss": sum(losses) / max(len(self.datasets["val"]), 1), "val_dice": dice if np.isfinite(dice) else 0.0}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"task": "column_segmentation", "classes": ["background", "column"]}


def split_pairs(frame: pd.DataFrame, val_fraction: float, seed: int) -> dict[str, pd.DataFrame]:
    """Holdout by study: ``val_fraction`` of the studies (at least one) validate, the rest train."""
    studies = frame["study"].nunique()
    if studies < 2:
        raise LayoutError(f"need images of at least two studies to split off validation, found {studies}")
    splitter = GroupShuffleSplit(n_splits=1, test_size=max(val_fraction, 1.0 / studies), random_state=seed)
    train, val = next(splitter.split(frame, groups=frame["study"]))
    return {"train": frame.iloc[np.sort(train)].reset_index(drop=True), "val": frame.iloc[np.sort(val)].reset_index(drop=True)}


def train_2d_seg(cfg: TwoDSegConfig, resume: bool = False) -> Path:
    """Train the column U-Net on image / mask pairs.

    Args:
        cfg: the run config (``cfg.data.root``: pairs CSV or ``images/`` + ``masks/`` folder).
        resume: continue from the run folder's ``last.pt``.

    Returns:
        The run folder (``best.pt``, ``last.pt``, ``summary.csv``, ``curves.png``, ``config.yaml``, ``splits.csv``).
    """
    cfg.validate()
    return run_seeded_distributed(lambda device, ctx: _train(cfg, resume, device, ctx),
                                  device=cfg.device, seed=cfg.seed, threads=cfg.train.threads)


def _train(cfg: TwoDSegConfig, resume: bool, device: torch.device, ctx: DistContext) -> Path:
    started = time.monotonic()
    frames = split_pairs(index_pairs(cfg.data.root), cfg.split.val_fraction, cfg.train.fold_seed)
    pairs = None
    if cfg.data.in_memory:
        decoder = PairDataset(pd.concat(frames.values(), ignore_index=True), cfg, train=False)
        decoded = [decoder.decode(i) for i in tqdm(range(len(decoder)), desc="decode pairs", leave=False, disable=None)]
        pairs = {"train": decoded[: len(frames["train"])], "val": decoded[len(frames["train"]):]}
    run_dir = prepare_run_dir(cfg.fold_dir(), cfg, resume, write=ctx.is_main)
    task = ColumnSegTask(cfg, frames, pairs, device)
    if ctx.is_main:
        pd.concat([f.assign(split=name) for name, f in frames.items()], ignore_index=True).to_csv(
            run_dir / "splits.csv", index=False)
    barrier(ctx)
    log.info("column U-Net: %d train / %d val images", len(frames["train"]), len(frames["val"]))
    return fit(task, cfg, run_dir, device=device, ctx=ctx, resume=resume, started=started)

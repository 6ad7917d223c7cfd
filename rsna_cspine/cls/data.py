"""Stage-2 training data: (study, vertebra) items over the crop cache, with stack-consistent augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.crops.cache import load_vertebra_stack
from rsna_cspine.crops.extract import to_unit_float
from rsna_cspine.errors import CSpineError
from rsna_cspine.training.augment import StackAugment, item_seed

ITEM_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "vertebra", "label", "path", "present")


def vertebra_items(labels: pd.DataFrame, crop_paths: dict[str, str | Path]) -> pd.DataFrame:
    """One row per (study, vertebra) of every study that has crops.

    Args:
        labels: train.csv-like table (StudyInstanceUID, C1..C7).
        crop_paths: study → its crop ``.npz``.

    Returns:
        Columns StudyInstanceUID, vertebra (0 = C1), label (0/1), path, present (vertebra found by the mask).
    """
    rows = []
    for record in labels.itertuples(index=False):
        uid = str(record.StudyInstanceUID)
        if uid not in crop_paths:
            continue
        path = Path(crop_paths[uid])
        try:
            with np.load(path) as data:
                present = data["present"].astype(bool)
        except (OSError, KeyError, ValueError) as exc:
            raise CSpineError(f"unreadable crop file ({exc})", path) from exc
        for i, name in enumerate(VERTEBRAE):
            rows.append((uid, i, int(getattr(record, name)), str(path), bool(present[i])))
    return pd.DataFrame(rows, columns=list(ITEM_COLUMNS))


def intensity_levels(stack: torch.Tensor) -> torch.Tensor:
    """``(2, C)``: each channel's median (soft tissue fills most of a crop) and 99th percentile (dense
    bone) over a ``(N, C, H, W)`` stack."""
    return torch.quantile(stack.transpose(0, 1).reshape(stack.shape[1], -1), torch.tensor([0.5, 0.99]), dim=1)


def match_levels(source: torch.Tensor, source_levels: torch.Tensor, reference_levels: torch.Tensor) -> torch.Tensor:
    """``source`` (N, C, H, W) mapped channel by channel onto another stack's :func:`intensity_levels`.

    Bone and soft-tissue densities differ from study to study; without this a pasted region shows up
    by its brightness alone. The linear map per channel takes the source's two levels to the
    reference's. A channel flat in either stack (the mask plane, an empty window) is left unchanged.
    """
    src_span = source_levels[1] - source_levels[0]
    ref_span = reference_levels[1] - reference_levels[0]
    usable = (src_span > 0.02) & (ref_span > 0.02)
    scale = torch.where(usable, ref_span / src_span.clamp_min(1e-6), torch.ones_like(src_span))
    shift = torch.where(usable, reference_levels[0] - source_levels[0] * scale, torch.zeros_like(src_span))
    return (source * scale[None, :, None, None] + shift[None, :, None, None]).clamp_(0.0, 1.0)


class VertebraDataset(Dataset):
    """Items of :func:`vertebra_items` (present vertebrae only) → model inputs.

    Each item gives ``image (N, C, S, S)`` float32 in [0, 1], ``label`` float, ``slice_labels (N,)`` int64
    (-1 unknown), its ``vertebra`` (0 = C1) and its row ``index``. A negative vertebra's slices are all
    known negatives.

    Args:
        items: rows of :func:`vertebra_items`.
        augment: stack augmentation, or None (validation).
        seed: run seed (with the epoch and the item index it fixes each item's augmentation).
        in_memory: keep decoded stacks after their first read.
        paste_prob: chance that a fracture-free item, when augmented, gets the boxed fracture regions of a
            fractured item of the same vertebra pasted in (see :meth:`_paste`); 0 = never.
        paste_feather: Gaussian sigma in pixels of the pasted regions' soft edge.
    """

    def __init__(self, items: pd.DataFrame, augment: StackAugment | None = None, seed: int = 0, in_memory: bool = False,
                 paste_prob: float = 0.0, paste_feather: float = 1.5) -> None:
        self.items = items.reset_index(drop=True)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.in_memory = in_memory
        self.paste_prob = paste_prob
        self.paste_feather = paste_feather
        self._memory: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._levels: dict[int, torch.Tensor] = {}  # intensity_levels per item, for pasting
        fractured = self.items[self.items["label"] == 1]
        self._donors = {int(v): group.index.to_numpy() for v, group in fractured.groupby("vertebra")}

    def preload(self) -> None:
        """Read every item's stack now (``in_memory`` only).

        Loader worker processes start from a copy of this dataset each epoch: stacks read here are
        shared with them, where stacks a worker reads are lost with it at the end of its epoch.
        """
        if self.in_memory:
            for index in range(len(self.items)):
                self._stack(index)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws are used (call before building the loader's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _stack(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if index in self._memory:
            return self._memory[index]
        row = self.items.iloc[index]
        stack = load_vertebra_stack(row["path"], int(row["vertebra"]))
        if self.in_memory:
            self._memory[index] = stack
        return stack

    def _item_levels(self, index: int, stack: torch.Tensor) -> torch.Tensor:
        """:func:`intensity_levels` of item ``index``'s un-augmented ``stack``, computed once per item."""
        if index not in self._levels:
            self._levels[index] = intensity_levels(stack)
        return self._levels[index]

    def _paste(self, index: int, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Copy-paste augmentation: a fractured stack's boxed regions blended into fracture-free ``image``.

        The donor is a fractured item of the same vertebra; stacks are cut around the whole vertebra and
        resized, so a box on centre slice ``n`` of the donor lands on the same part of the vertebra on
        slice ``n`` here, give or take the two studies' anatomy. Every plane (neighbours, windows, mask)
        inside a feathered box takes the donor's pixels. Returns ``(image, slice_labels, box_map)`` or
        None (no paste drawn, or the drawn donor has no box on any of its slices).
        """
        # Its own stream: the item's geometric draws (torch RNG) stay the same with or without a paste.
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        if rng.random() >= self.paste_prob:
            return None
        donors = self._donors.get(int(self.items.at[index, "vertebra"]), np.zeros(0, dtype=np.int64))
        if len(donors) == 0:
            return None
        donor_index = int(donors[rng.integers(len(donors))])
        donor_images, donor_slices, donor_maps = self._stack(donor_index)
        region = np.asarray(donor_maps, dtype=np.float32) * (np.asarray(donor_slices) > 0)[:, None, None]
        if not region.any():
            return None
        alpha = region
        if self.paste_feather > 0:  # 1 inside the box, fading to 0 over ~2 sigma outside it
            blurred = ndimage.gaussian_filter(region, sigma=(0.0, self.paste_feather, self.paste_feather))
            alpha = np.maximum(region, np.clip(2.0 * blurred, 0.0, 1.0))
        weight = torch.from_numpy(alpha)[:, None]
        donor = torch.from_numpy(to_unit_float(donor_images))
        donor = match_levels(donor, self._item_levels(donor_index, donor), self._item_levels(index, image))
        pasted = weight * donor + (1.0 - weight) * image
        slice_target = torch.from_numpy(region.reshape(len(region), -1).any(axis=1).astype(np.int64))
        return pasted, slice_target, torch.from_numpy(region)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        images, slice_labels, _ = self._stack(index)
        label = int(self.items.at[index, "label"])
        image = torch.from_numpy(to_unit_float(images))
        slice_target = torch.from_numpy(np.asarray(slice_labels, dtype=np.int64))
        if label == 0:
            slice_target = torch.zeros_like(slice_target)
            pasted = self._paste(index, image) if self.augment is not None and self.paste_prob > 0 else None
            if pasted is not None:
                image, slice_target, _ = pasted
                label = 1
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, index))
                image = self.augment(image)
        return {
            "image": image,
            "label": torch.tensor(float(label)),
            "slice_labels": slice_target,
            "vertebra": torch.tensor(int(self.items.at[index, "vertebra"])),
            "index": torch.tensor(index),
        }

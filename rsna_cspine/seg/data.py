"""Training data for stage 1: cached studies → MONAI dictionary transforms → loaders.

Three inputs come from the cache (:func:`~rsna_cspine.seg.preprocess.cache_training_study`): ``grid``,
the whole study on the grid (no cascade); ``fine``, the cascade's box around the neck, stored larger than
the grid so that training crops it at a random offset (a localiser that missed the centre); and
``localiser``, the whole study at the coarse spacing, cervical spine against the rest.

Data order and augmentation depend only on (seed, epoch): each epoch gets a fresh loader whose
``torch.Generator`` is seeded from them; MONAI's DataLoader derives the random state of every
augmentation (in the main process or in each worker) from that generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import numpy as np
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    Compose,
    DivisiblePadd,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from torch.utils.data import DistributedSampler

from rsna_cspine.seg.config import SegAugmentConfig
from rsna_cspine.seg.preprocess import DEFAULT_HU_WINDOW, load_cached_study
from rsna_cspine.seg.randomise import randomisation_transforms


class LoadCachedStudyd(MapTransform):
    """Replace ``{"path": file}`` by the cached float16 ``image`` and folded ``label`` arrays (of the localiser's
    input when ``localiser``)."""

    def __init__(self, thoracic: str = "background", localiser: bool = False) -> None:
        super().__init__(keys=["path"])
        self.thoracic = thoracic
        self.localiser = localiser

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        out.update(load_cached_study(out.pop("path"), self.thoracic, localiser=self.localiser, dtype=np.float16))
        return out


#: The network inputs a cache file holds (see the module docstring).
INPUTS: tuple[str, ...] = ("grid", "fine", "localiser")


def build_transforms(
    aug: SegAugmentConfig,
    grid: Sequence[int],
    thoracic: str,
    train: bool,
    patch_size: Sequence[int] | None = None,
    patch_foreground: float = 0.75,
    hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
    source: str = "grid",
    divisor: int = 16,
) -> Compose:
    """Loading plus, for training, a random patch and MONAI augmentations applied alike to image and label.

    Args:
        aug: augmentation settings.
        grid: the cached grid ``(D, H, W)`` (translations are a fraction of it).
        thoracic: label folding (see ``preprocess.fold_labels``).
        train: add the random patch and augmentations.
        patch_size: train on this sub-volume (0 on an axis = the whole axis); None = the whole grid.
        patch_foreground: share of patches centred on a vertebra voxel (the rest on background).
        hu_window: HU window of the cached images (the randomisation's HU bands are placed with it).
        source: which cached input (``INPUTS``): ``grid`` is used whole (or patched), ``fine`` is cropped to
            ``grid`` (centred for validation, at random for training), ``localiser`` is padded to ``grid``,
            cropped to it at random for training and used whole (padded to ``divisor``) for validation.
        divisor: what every side of a validation input of the localiser must be divisible by (the network's).
    """
    if source not in INPUTS:
        raise ValueError(f"source must be one of {INPUTS}, got {source!r}")
    steps: list = [LoadCachedStudyd(thoracic, localiser=source == "localiser")]
    patch = tuple(int(p) if p else int(g) for p, g in zip(patch_size, grid)) if patch_size else tuple(grid)
    if source == "localiser":
        # Air (0 after the window) around a scan smaller than the grid, as the sliding window pads it.
        steps.append(SpatialPadd(keys=["image", "label"], spatial_size=tuple(grid), value=0))
        if not train:
            steps.append(DivisiblePadd(keys=["image", "label"], k=divisor, value=0))
    elif source == "fine" and not train:
        steps.append(CenterSpatialCropd(keys=["image", "label"], roi_size=tuple(grid)))  # a perfect localiser
    elif source == "fine":
        # The grid where a localiser that missed the neck's centre by up to the stored margin would put it:
        # an offset drawn uniformly per axis, whatever the labels. (A patch crop centred on a label voxel
        # would instead clamp most offsets to the margin's ends, a shift the localiser seldom makes.)
        steps.append(RandSpatialCropd(keys=["image", "label"], roi_size=tuple(grid), random_size=False))
    if train and (patch != tuple(grid) or source == "localiser"):
        # The spine fills a small part of each slice: patches around it spend the (CPU) budget where the
        # labels are, while background patches keep teaching what is not a vertebra.
        steps.append(
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=patch,
                pos=patch_foreground, neg=1.0 - patch_foreground, num_samples=1,
            )
        )
    # Float32 from here on (the cropped image only): the loaded studies stay float16 in the dataset's cache.
    steps.append(CastToTyped(keys=["image"], dtype=np.float32))
    if train and aug.enabled:
        steps += [
            RandAffined(
                keys=["image", "label"],
                prob=aug.affine_prob,
                rotate_range=tuple(aug.rotate_rad),
                scale_range=(aug.scale,) * 3,
                translate_range=tuple(aug.translate_frac * g for g in grid),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            # Spatial axis 2 is x (left-right): labels are not lateralised, so this flip is harmless.
            # Never flip z: C1 must stay superior.
            RandFlipd(keys=["image", "label"], prob=aug.flip_x_prob, spatial_axis=2),
        ]
        # Domain randomisation (intensities stop meaning tissue), then noise and intensity jitter.
        steps += randomisation_transforms(aug, hu_window)
        steps += [
            RandGaussianNoised(keys=["image"], prob=aug.noise_prob, std=aug.noise_std),
            RandScaleIntensityd(keys=["image"], prob=aug.intensity_scale_prob, factors=aug.intensity_scale),
            RandShiftIntensityd(keys=["image"], prob=aug.intensity_shift_prob, offsets=aug.intensity_shift),
        ]
    steps.append(EnsureTyped(keys=["image", "label"], track_meta=False))
    return Compose(steps)


def make_dataset(paths: Sequence[Path], transform: Compose) -> Dataset:
    """A MONAI ``CacheDataset`` over cache files (items are ``{"path": file}``).

    The loaded arrays (the deterministic first step) stay in memory, so each epoch pays only for the
    random crop and augmentations, not for decompressing every file again.
    """
    return CacheDataset(data=[{"path": str(p)} for p in paths], transform=transform, num_workers=0, progress=False)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader whose order and augmentation are a function of (seed, epoch[, rank]) only.

    Args:
        dataset: from :func:`make_dataset`.
        batch_size: studies per batch.
        shuffle: shuffle the studies (training).
        seed: run seed.
        epoch: epoch index (0-based).
        num_workers: loader processes (0 = in the main process).
        rank: process rank under torchrun.
        world_size: number of processes under torchrun.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank))
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=False,
        persistent_workers=False,
    )

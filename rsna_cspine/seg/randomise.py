"""Domain randomisation for stage 1: train on intensities that do not mean tissue, so the network learns
the vertebrae's shape and context rather than "bright = vertebra".

In the spirit of SynthSeg (Billot B et al., *Medical Image Analysis* 2023;86:102789): each training
sample may get random intensities per tissue, a smooth bias field, blur, a lower resolution, a gamma
curve (and, already in ``seg.data``, noise and an intensity scale/shift). SynthSeg draws the per-tissue
intensities from a label map of every tissue; real training sets (the RSNA segmentations) label only
the vertebrae, so here the tissues are HU bands of the image itself: the cached image is a HU window
mapped to [0, 1], and a random lookup over the band edges (air/lung, fat, water, soft tissue,
cartilage and enhanced vessels, trabecular bone, cortex, teeth and metal) gives every band a new,
possibly non-monotonic intensity. The same transform works on phantoms and on real studies, and on the
grid cache as it is (no tissue map needed). Only stage 1 sees it: stage 2's crops stay in HU.

MONAI supplies the bias field, blur, low-resolution and gamma transforms; the band lookup is written
here because MONAI's histogram transforms (``RandHistogramShift``) are monotonic and know no HU.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    MapTransform,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandSimulateLowResolutiond,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from rsna_cspine.seg.config import SegAugmentConfig

#: Band edges in HU (below the window's low end everything is air or lung; above its top, teeth and metal).
BAND_EDGES_HU: tuple[float, ...] = (-100.0, 0.0, 50.0, 150.0, 350.0, 800.0)
#: Edges that are bone: kept at least ``min_contrast`` away from the soft-tissue edge (50 HU) so the
#: vertebrae never vanish into the muscle around them.
BONE_EDGES_HU: tuple[float, ...] = (350.0, 800.0)


class RandHUBandRemapd(RandomizableTransform, MapTransform):
    """Random piecewise-linear lookup of a windowed HU image over HU band edges (labels untouched).

    The knots are the window's ends and ``BAND_EDGES_HU`` inside it; each knot gets a uniform random
    intensity in [0, 1] (bone knots and the window's top at least ``min_contrast`` from the
    soft-tissue knot), and intensities between knots are interpolated, so every band keeps its inner
    texture but no longer has its usual brightness.

    Args:
        keys: image keys (the label must not be listed).
        hu_window: the ``(low, high)`` HU window the image was mapped to [0, 1] with.
        prob: probability of remapping a sample.
        min_contrast: least distance between a bone knot and the soft-tissue knot.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Sequence[Hashable], hu_window: Sequence[float], prob: float = 0.5,
                 min_contrast: float = 0.15, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = float(hu_window[0]), float(hu_window[1])
        if high <= low:
            raise ValueError(f"hu_window must rise, got {hu_window}")
        inside = [e for e in BAND_EDGES_HU if low < e < high]
        self.knots_hu = np.array([low, *inside, high])
        self.knots = (self.knots_hu - low) / (high - low)
        self.soft = int(np.argmin(np.abs(self.knots_hu - 50.0)))
        self.bone = [i for i, e in enumerate(self.knots_hu) if e in BONE_EDGES_HU or i == len(self.knots) - 1]
        self.bone = [i for i in self.bone if i != self.soft]
        self.min_contrast = float(min_contrast)
        self.values = self.knots.copy()

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        values = self.R.uniform(0.0, 1.0, size=len(self.knots))
        away = self.R.choice([-1.0, 1.0], size=len(self.knots))
        soft = values[self.soft]
        for i in self.bone:
            if abs(values[i] - soft) < self.min_contrast:
                target = soft + away[i] * self.min_contrast
                if not 0.0 <= target <= 1.0:
                    target = soft - away[i] * self.min_contrast
                values[i] = target
        self.values = values

    def lookup(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Apply the current knot values to an image in window units (values outside [0, 1] clamp)."""
        x = convert_to_tensor(image, track_meta=False, dtype=torch.float32)
        knots = torch.as_tensor(self.knots, dtype=x.dtype, device=x.device)
        values = torch.as_tensor(self.values, dtype=x.dtype, device=x.device)
        x = x.clamp(0.0, 1.0)
        index = torch.clamp(torch.bucketize(x, knots) - 1, 0, len(self.knots) - 2)
        left, right = knots[index], knots[index + 1]
        t = (x - left) / (right - left)
        out = values[index] + t * (values[index + 1] - values[index])
        return convert_to_dst_type(out, dst=image)[0]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            out[key] = self.lookup(out[key])
        return out


def randomisation_transforms(aug: SegAugmentConfig, hu_window: Sequence[float]) -> list:
    """The stage-1 randomisation steps (image only), in order; empty when ``aug.randomise`` is off.

    Args:
        aug: augmentation settings (``randomise`` and its probabilities and ranges).
        hu_window: HU window of the cached images.
    """
    if not aug.randomise:
        return []
    keys = ["image"]
    return [
        RandHUBandRemapd(keys, hu_window, prob=aug.hu_remap_prob, min_contrast=aug.hu_remap_min_contrast),
        RandBiasFieldd(keys, prob=aug.bias_field_prob, degree=3, coeff_range=(0.0, aug.bias_field_coeff)),
        RandGaussianSmoothd(keys, prob=aug.blur_prob, sigma_x=tuple(aug.blur_sigma), sigma_y=tuple(aug.blur_sigma),
                            sigma_z=tuple(aug.blur_sigma)),
        RandSimulateLowResolutiond(keys, prob=aug.low_res_prob, zoom_range=tuple(aug.low_res_zoom)),
        RandAdjustContrastd(keys, prob=aug.gamma_prob, gamma=tuple(aug.gamma)),
    ]

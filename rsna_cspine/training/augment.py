"""Stack-consistent image augmentation shared by stage 2 (vertebra stacks) and the 2D mode (single images)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from rsna_cspine.training.config import ImageAugConfig


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one item's augmentation: depends only on (run seed, epoch, item), never on worker or order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class StackAugment:
    """The same random geometry for every plane of a stack, and intensity jitter on the image planes.

    The image planes may also get Gaussian noise and a low-resolution simulation (nnU-Net's
    ``SimulateLowResolutionTransform``; SynthSeg's resolution randomisation): what a crop looks like when the
    patient is smaller, the scan noisier or coarser than those trained on.

    The geometry (random resized crop, flips, rotation, translation: the torchvision set) is composed
    into one affine map and applied with a single ``grid_sample`` over all ``N*C`` planes: one
    interpolation instead of torchvision's two, and less time per item (on the 2-core CPU an 8×11×80²
    stack took 12 ms through the torchvision chain; the augmentation ran in series with every step).
    Hand-written because the MONAI chain that does the same jobs (``RandAffine``, ``RandFlip``, intensity
    transforms) took 2.6–5× as long on every shipped stack shape (``benchmarks/bench_augment.py``).

    Args:
        cfg: augmentation settings.
        size: output height and width.
        image_channels: leading channels per slice that are CT intensities (a trailing mask plane is
            moved geometrically but never brightened).
    """

    def __init__(self, cfg: ImageAugConfig, size: int, image_channels: int) -> None:
        self.cfg = cfg
        self.size = size
        self.image_channels = image_channels

    def _uniform(self, low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand(()))

    def affine(self) -> torch.Tensor:
        """One random ``(2, 3)`` map from output to input coordinates, both normalised to [-1, 1].

        Crop: a box of ``scale_min``..1 of the area with aspect ratio 0.85..1/0.85, placed anywhere inside
        the image; then flips; then a rotation about the centre and a shift of up to ``translate`` of the size.
        """
        cfg = self.cfg
        area = self._uniform(cfg.scale_min, 1.0)
        log_ratio = self._uniform(math.log(0.85), -math.log(0.85))
        width = min(math.sqrt(area * math.exp(log_ratio)), 1.0)
        height = min(math.sqrt(area / math.exp(log_ratio)), 1.0)
        centre = torch.tensor([self._uniform(width - 1.0, 1.0 - width), self._uniform(height - 1.0, 1.0 - height)])
        flip = torch.tensor([
            -1.0 if torch.rand(()) < cfg.hflip else 1.0,
            -1.0 if torch.rand(()) < cfg.vflip else 1.0,
        ])
        angle = math.radians(self._uniform(-cfg.rotate_deg, cfg.rotate_deg))
        shift = torch.tensor([self._uniform(-cfg.translate, cfg.translate), self._uniform(-cfg.translate, cfg.translate)]) * 2
        # output p → un-rotate and un-shift → flip → into the crop box: input = c + D·F·R⁻¹·(p − t).
        cos, sin = math.cos(angle), math.sin(angle)
        inverse_rotation = torch.tensor([[cos, sin], [-sin, cos]])
        linear = torch.diag(torch.tensor([width, height]) * flip) @ inverse_rotation
        offset = centre - linear @ shift
        return torch.cat([linear, offset[:, None]], dim=1)

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        """Augment one ``(N, C, H, W)`` stack in [0, 1] using torch's global RNG (seed it per item)."""
        n, c, h, w = stack.shape
        theta = self.affine()[None]
        grid = F.affine_grid(theta, [1, n * c, self.size, self.size], align_corners=False)
        out = F.grid_sample(stack.reshape(1, n * c, h, w), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False).reshape(n, c, self.size, self.size)
        # A per-stack affine intensity change works for any channel count (torchvision's jitter wants 1 or 3).
        contrast = 1.0 + (torch.rand(()) * 2 - 1) * self.cfg.contrast
        brightness = (torch.rand(()) * 2 - 1) * self.cfg.brightness
        images = out[:, : self.image_channels]  # a view: changed in place, no copies of the stack
        self.degrade(images)
        mean = images.mean()
        images.sub_(mean).mul_(contrast).add_(mean + brightness).clamp_(0.0, 1.0)
        return out

    def degrade(self, images: torch.Tensor) -> None:
        """Noise, then fewer pixels, on ``(N, C, H, W)`` image planes in place (both off by default)."""
        if self.cfg.noise_std > 0 and images.numel():
            images.add_(torch.randn(images.shape) * (torch.rand(()) * self.cfg.noise_std))
        if self.cfg.low_res_zoom < 1.0 and images.numel():
            small = max(4, round(self.size * self._uniform(self.cfg.low_res_zoom, 1.0)))
            if small < self.size:
                n, c = images.shape[:2]
                planes = images.reshape(1, n * c, self.size, self.size)
                shrunk = F.interpolate(planes, size=(small, small), mode="area")
                images.copy_(F.interpolate(shrunk, size=(self.size, self.size), mode="bilinear",
                                           align_corners=False).reshape(images.shape))

"""The cascade's coarse pass: find the cervical spine in a whole study before the fine grid is placed.

A small network sees the study at a fixed coarse spacing (``localiser.spacing``, windows of
``localiser.grid`` voxels sliding over larger scans) and labels cervical-spine voxels; the largest
connected group of them is the neck. Its box's middle is where the fine pass centres its
``data.grid × data.spacing`` mm (:class:`~rsna_cspine.seg.predict.Segmenter`), so a head-to-chest
scan at 3 mm keeps the fine resolution on the neck (the cascade of nnU-Net and TotalSegmentator).

The localiser trains in the same run as the fine network (``seg.train``) and travels in the fine
network's checkpoints (``extra["localiser"]``: its config and weights).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from rsna_cspine.config import config_from_checkpoint, to_dict
from rsna_cspine.engine import autocast
from rsna_cspine.errors import CSpineError
from rsna_cspine.io.volume import Volume
from rsna_cspine.seg.boxes import coarse_shape, grid_to_voxel
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.model import build_model, window_logits
from rsna_cspine.seg.preprocess import preprocess_volume

#: Checkpoint ``extra`` key holding the localiser (``{"config": ..., "model": state_dict}``).
CHECKPOINT_KEY = "localiser"
#: Network outputs of the localiser: background and cervical spine.
LOCALISER_CLASSES = 2


def localiser_config(cfg: SegConfig) -> SegConfig:
    """The run config the localiser trains with: the fine run's, with the coarse grid, spacing and network.

    It keeps the seed, data, augmentation and optimiser of the fine run; ``data.grid``/``data.spacing``
    become the coarse ones, ``model`` the localiser's, training and validation use whole crops of the coarse grid.

    Args:
        cfg: the fine network's resolved config (``localiser.enabled``).
    """
    loc = cfg.localiser
    out = copy.deepcopy(cfg)
    out.data.grid = tuple(loc.grid)  # type: ignore[assignment]
    out.data.spacing = tuple(loc.spacing)
    out.model = copy.deepcopy(loc.model)
    out.train.epochs = loc.epochs
    out.train.patch_size = (0, 0, 0)
    out.train.patch_foreground = loc.patch_foreground
    out.predict.roi_size = (0, 0, 0)  # its windows are its whole grid (``Localiser.probabilities``)
    out.localiser.enabled = False
    return out


@dataclass
class NeckLocation:
    """Where the localiser found the cervical spine.

    Attributes:
        centre: middle of the found piece's box, ``(z, y, x)`` in original voxel coordinates.
        extent_mm: the box's size in mm.
        coarse_voxels: coarse voxels in the piece.
    """

    centre: tuple[float, float, float]
    extent_mm: tuple[float, float, float]
    coarse_voxels: int


class Localiser:
    """The coarse network(s) of one or more stage-1 checkpoints (probabilities averaged).

    Args:
        models: networks with one config (``cfg``).
        cfg: their config (``localiser_config`` of the run they came from).
        device: where to run.
        amp: mixed precision on GPU.
    """

    def __init__(self, models: Sequence[torch.nn.Module], cfg: SegConfig, device: torch.device, amp: bool = True):
        if not models:
            raise ValueError("Localiser needs at least one model")
        self.models = [m.to(device).eval() for m in models]
        self.cfg = cfg
        self.device = device
        self.amp = amp

    @classmethod
    def from_checkpoint_extra(cls, extras: Sequence[dict[str, Any]], device: torch.device, sources: Sequence[str | Path],
                              amp: bool = True) -> Localiser:
        """Rebuild the localisers stored in stage-1 checkpoints (their ``extra``).

        Args:
            extras: each checkpoint's ``extra``.
            device: where to run.
            sources: the checkpoint files (named in errors).
            amp: mixed precision on GPU.
        """
        models, cfg = [], None
        for extra, source in zip(extras, sources):
            stored = extra.get(CHECKPOINT_KEY)
            if not stored:
                raise CSpineError("the config asks for the cascade but the checkpoint carries no localiser", source)
            this = config_from_checkpoint(SegConfig, stored["config"], source)
            if cfg is not None and _geometry(this) != _geometry(cfg):
                raise CSpineError("checkpoints disagree on the localiser's grid, spacing or HU window", source)
            cfg = cfg or this
            model = build_model(this.model, LOCALISER_CLASSES)
            model.load_state_dict(stored["model"])
            models.append(model)
        assert cfg is not None
        return cls(models, cfg, device, amp=amp)

    @torch.inference_mode()
    def probabilities(self, volume: Volume) -> torch.Tensor:
        """Cervical-spine probability on the coarse grid of the whole study, ``(d, h, w)`` on ``self.device``.

        Args:
            volume: the loaded study.
        """
        d = self.cfg.data
        shape = coarse_shape(volume.shape, volume.spacing, d.spacing)
        image = preprocess_volume(volume, shape, d.hu_window, antialias=d.antialias)
        x = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
        total = None
        for model in self.models:
            with autocast(self.device, self.amp):
                # The windows its validation ran in (whole coarse grids, ``localiser_config``), blended the same way.
                logits = window_logits(model, x, self.cfg.predict, d.grid)
            p = torch.softmax(logits.float(), dim=1)[0, 1]
            total = p if total is None else total + p
        return total / len(self.models)

    def locate(self, volume: Volume) -> NeckLocation | None:
        """The largest group of voxels the localiser calls cervical spine (pieces closer than one coarse voxel
        count as one); None when it finds none.

        Args:
            volume: the loaded study.
        """
        probs = self.probabilities(volume)
        found = probs > 0.5
        if not bool(found.any()):
            return None
        found = found.cpu().numpy()
        # Discs are not bone: at the coarse spacing a disc can leave a background slice between two
        # vertebrae. Pieces are grouped across such a one-voxel gap (a dilation), then the group with
        # the most labelled voxels is the neck.
        groups, n = ndimage.label(ndimage.binary_dilation(found, iterations=1), structure=np.ones((3, 3, 3)))
        sizes = np.bincount(groups[found], minlength=n + 1)
        piece = found & (groups == int(np.argmax(sizes[1:])) + 1)
        centre, extent = [], []
        for axis, (n_coarse, n, step) in enumerate(zip(piece.shape, volume.shape, volume.spacing)):
            present = np.flatnonzero(piece.any(axis=tuple(a for a in range(3) if a != axis)))
            lo, hi = int(present[0]), int(present[-1])
            centre.append(float(grid_to_voxel((lo + hi) / 2.0, n_coarse, 0, n)))
            extent.append((hi - lo + 1) * n / n_coarse * float(step))
        return NeckLocation(tuple(centre), tuple(extent), int(piece.sum()))  # type: ignore[arg-type]


def localiser_checkpoint_entry(cfg: SegConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What a fine network's checkpoints carry of their localiser (``extra["localiser"]``).

    Args:
        cfg: the localiser's config (``localiser_config``).
        model: its trained network.
    """
    return {"config": to_dict(cfg), "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _geometry(cfg: SegConfig) -> tuple:
    d = cfg.data
    return tuple(d.grid), tuple(d.spacing), tuple(d.hu_window), d.antialias

"""Stage-1 inference: Volume → vertebra mask at the original resolution + a per-vertebra table.

:class:`Segmenter` finds the neck (the cascade's localiser, :mod:`rsna_cspine.seg.localise`), runs the
network(s) on the grid, hands the result to :mod:`rsna_cspine.seg.masks` for the full-resolution mask
and the table, and checks the anatomy (:mod:`rsna_cspine.seg.qc`); :mod:`rsna_cspine.seg.batch` does it
for every study of a split (``rsna-cspine predict-seg``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import KeepLargestConnectedComponent

from rsna_cspine.config import config_from_checkpoint
from rsna_cspine.constants import CERVICAL_LABELS
from rsna_cspine.engine import autocast, load_checkpoint, resolve_device
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.io.volume import Volume
from rsna_cspine.seg.config import SegConfig
from rsna_cspine.seg.boxes import VoxelBox, box_size, size_scale
from rsna_cspine.seg.localise import Localiser, NeckLocation
from rsna_cspine.seg.masks import (
    UPSAMPLE_MODES,
    mask_table,
    nearest_histograms,
    neck_length_mm,
    place_box,
    table_from_histograms,
    upsample_linear,
    upsample_mask,
)
from rsna_cspine.seg.model import build_model, window_logits
from rsna_cspine.seg.preprocess import num_classes, preprocess_volume
from rsna_cspine.seg.qc import DROPPED, QCLimits, check_vertebrae, dropped_labels, qc_summary, too_large

log = logging.getLogger(__name__)

#: The localiser's neck (C1's top to C7's bottom, on its 6-mm grid) over ``seg.masks.neck_length_mm`` (C1's
#: centre to C7's): about 1.2 in adult anatomy, and 1.19 and 1.22 (medians) on two sets of 16 phantoms.
LOCALISER_SPAN_RATIO = 1.2


@dataclass
class SegmentationResult:
    """What stage 1 says about one study.

    Attributes:
        mask: uint8 ``(z, y, x)`` at the volume's resolution; 1..7 = C1..C7, 0 elsewhere. After the
            quality check only the vertebrae it kept are in it.
        vertebrae: one row per vertebra (``VERTEBRA_COLUMNS``, plus ``QC_COLUMNS`` after the check):
            ``found`` and the bounds say what the network labelled, ``qc`` whether it is used.
        grid_mask: uint8 ``(D, H, W)`` label map on the network grid (of the fine box with the cascade).
        box: the region the network saw, in the volume's voxels (the whole volume without the cascade;
            None when the localiser found no cervical spine).
        neck: what the cascade's localiser found (None without the cascade or when it found nothing).
    """

    mask: np.ndarray
    vertebrae: pd.DataFrame
    grid_mask: np.ndarray
    box: VoxelBox | None = None
    neck: NeckLocation | None = None

    @property
    def qc(self) -> str:
        """One-line verdict of the quality check ('' before it ran)."""
        return qc_summary(self.vertebrae) if "qc" in self.vertebrae else ""


class Segmenter:
    """One or more trained stage-1 networks (probabilities averaged) with their preprocessing settings.

    Public steps: :meth:`locate` (the cascade's coarse pass: where the fine grid goes), :meth:`segment`
    (the network's labels at the volume's resolution: :meth:`grid_labels` on a box, then :meth:`map_back`),
    :meth:`check` (the anatomical quality check); :meth:`predict` runs the three.

    Args:
        models: networks sharing one config (e.g. the folds of one run).
        cfg: the config they were trained with (grid, HU window, thoracic mode, cascade, inference settings).
        device: where to run.
        amp: mixed precision on GPU.
        localiser: the cascade's coarse pass (needed when ``cfg.data.spacing`` is set).
        qc_limits: thresholds of the quality check (default ``qc.QCLimits()``).
    """

    def __init__(self, models: Sequence[torch.nn.Module], cfg: SegConfig, device: torch.device, amp: bool = True,
                 localiser: Localiser | None = None, qc_limits: QCLimits | None = None):
        if not models:
            raise ValueError("Segmenter needs at least one model")
        if cfg.data.cascade and localiser is None:
            raise ConfigError("data.spacing is set (the cascade) but no localiser was given")
        self.models = [m.to(device).eval() for m in models]
        self.cfg = cfg
        self.device = device
        self.amp = amp
        self.localiser = localiser if cfg.data.cascade else None
        self.qc_limits = qc_limits or QCLimits()
        self._keep_largest = KeepLargestConnectedComponent(applied_labels=list(CERVICAL_LABELS), independent=True)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(g) for g in self.cfg.data.grid)  # type: ignore[return-value]

    @torch.inference_mode()
    def predict_probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Softmax probabilities ``(C, D, H, W)`` on the grid (mean over the models and, with
        ``predict.mirror``, over the input and its left-right mirror), on ``self.device``.

        Args:
            image: ``(1, D, H, W)`` output of ``preprocess_volume`` with this segmenter's settings.
        """
        x = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
        views = [x, x.flip(-1)] if self.cfg.predict.mirror else [x]  # W is the patient's left-right axis
        probs = None
        for model in self.models:
            for i, view in enumerate(views):
                with autocast(self.device, self.amp):
                    logits = window_logits(model, view, self.cfg.predict, self.grid)
                p = torch.softmax(logits.float(), dim=1)
                p = p.flip(-1) if i else p
                probs = p if probs is None else probs + p
        return probs[0] / (len(self.models) * len(views))

    @torch.inference_mode()
    def clean(self, probs: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Grid label map (C1..C7 as 1..7, 0 elsewhere) after the largest-component clean-up, and the
        probabilities with the removed stray voxels handed to the background.

        Args:
            probs: ``(C, D, H, W)`` from :meth:`predict_probabilities` (modified in place).
        """
        # max().indices, not argmax(): the same labels, ~10x faster over the channel axis on CPU (measured
        # on an 8 x 64 x 128 x 128 grid: 0.016 s against 0.19 s; evidence.md, "Validation crops through stage 1").
        labels = probs.max(dim=0, keepdim=True).indices  # (1, D, H, W)
        labels[labels > max(CERVICAL_LABELS)] = 0  # the optional thoracic class is not part of the mask
        if self.cfg.predict.keep_largest_component:
            kept = torch.as_tensor(self._keep_largest(labels.clone())).to(labels.device)  # it works in place
            removed = (labels > 0) & (kept == 0)
            # Removed voxels become certain background, so they stay background once interpolated.
            probs[:, removed[0]] = 0.0
            probs[0][removed[0]] = 1.0
            labels = kept
        return labels[0].to(torch.uint8).cpu().numpy(), probs

    def predict_grid(self, image: np.ndarray) -> np.ndarray:
        """Cleaned label map on the grid for a preprocessed ``(1, D, H, W)`` image.

        Args:
            image: output of ``preprocess_volume`` with this segmenter's settings.
        """
        return self.clean(self.predict_probabilities(image))[0]

    @property
    def fits_box_to_neck(self) -> bool:
        """Whether a second box is fitted to the neck a first pass found (the cascade with
        ``data.reference_neck_mm``; see :meth:`refine_box`)."""
        return self.localiser is not None and self.cfg.data.reference_neck_mm > 0

    def accepts(self, grid: Sequence[int], hu_window: Sequence[float], antialias: bool) -> bool:
        """Whether an image preprocessed with these settings is this segmenter's input (so it can be reused).
        Never for the cascade: its fine box goes where its own localiser finds the neck.

        Args:
            grid: ``(D, H, W)``.
            hu_window: ``(low, high)``.
            antialias: see ``preprocess_volume``.
        """
        d = self.cfg.data
        return not d.cascade and ([int(g) for g in grid], [float(h) for h in hu_window], bool(antialias)) == (
            [int(g) for g in d.grid], [float(h) for h in d.hu_window], bool(d.antialias))

    def locate(self, volume: Volume) -> tuple[VoxelBox | None, NeckLocation | None]:
        """The region the network looks at first: the whole volume, or with the cascade ``data.grid ×
        data.spacing`` mm centred on the neck the localiser found, with ``data.reference_neck_mm`` scaled by
        the localiser's length of it as a first guess (``(None, None)`` when it found none).

        Args:
            volume: the loaded study.
        """
        if self.localiser is None:
            return VoxelBox.whole(volume.shape), None
        neck = self.localiser.locate(volume)
        if neck is None:
            return None, None
        scale = size_scale(neck.extent_mm[0] / LOCALISER_SPAN_RATIO, self.cfg.data.reference_neck_mm)
        spacing = tuple(v * scale for v in self.cfg.data.spacing)
        return VoxelBox.centred(neck.centre, box_size(volume.spacing, self.grid, spacing)), neck

    def segment(self, volume: Volume, image: np.ndarray | None = None) -> SegmentationResult:
        """The network's C1..C7 labels at the volume's resolution, before the quality check.

        ``predict.upsample`` = ``linear`` takes the argmax of trilinearly interpolated probabilities
        (smooth boundaries, a few slices at a time); ``nearest`` expands the grid label map (fastest).
        With the cascade the labels are mapped back into the fine box and every voxel outside it is 0;
        with ``data.reference_neck_mm`` a second pass labels the box that :meth:`refine_box` fits to the
        neck the first pass found (measured on its nearest-neighbour labels; the first pass's labels are
        returned when no other box is fitted).

        Args:
            volume: the loaded study.
            image: the volume already preprocessed with this segmenter's settings (see :meth:`accepts`),
                e.g. by the stage-1 cache; None computes it here.
        """
        d = self.cfg.data
        if image is not None and not self.accepts(image.shape[1:], d.hu_window, d.antialias):
            raise ValueError(f"image {image.shape} is not this segmenter's input (see accepts())")
        box, neck = self.locate(volume)
        if box is None:
            log.info("study %s: the localiser found no cervical spine", volume.study_uid or "?")
            mask = np.zeros(volume.shape, dtype=np.uint8)
            return SegmentationResult(mask=mask, vertebrae=mask_table(mask[:1, :1, :1]),
                                      grid_mask=np.zeros(self.grid, dtype=np.uint8))
        grid_mask, probs = self.grid_labels(volume, box, image)
        if self.fits_box_to_neck:
            # The first pass only places and sizes the box: its nearest-neighbour table is enough. Against the
            # linear one's: held-out Dice +0.003/+0.004 on two sets, 7 % less segmentation time on a 512² ×
            # 300-slice study (evidence.md, "Stage 1's first pass").
            refined = self.refine_box(self.map_back(grid_mask, probs, box, volume, "nearest"), volume)
            if refined is not None and refined != box:
                box = refined
                grid_mask, probs = self.grid_labels(volume, box)
        result = self.map_back(grid_mask, probs, box, volume)
        result.neck = neck
        return result

    def segment_box(self, volume: Volume, box: VoxelBox, image: np.ndarray | None = None) -> SegmentationResult:
        """The network's labels in one box of the volume, mapped back to every slice (see :meth:`segment`).

        Args:
            volume: the loaded study.
            box: where the grid lies, in the volume's voxels.
            image: the box already preprocessed (``preprocess_volume``); None computes it here.
        """
        return self.map_back(*self.grid_labels(volume, box, image), box, volume)

    def grid_labels(self, volume: Volume, box: VoxelBox, image: np.ndarray | None = None
                    ) -> tuple[np.ndarray, torch.Tensor]:
        """:meth:`clean`'s label map and probabilities of one box of the volume, on the grid.

        Args:
            volume: the loaded study.
            box: where the grid lies, in the volume's voxels.
            image: the box already preprocessed (``preprocess_volume``); None computes it here.
        """
        d = self.cfg.data
        if image is None:
            image = preprocess_volume(volume, d.grid, d.hu_window, antialias=d.antialias, box=box)
        return self.clean(self.predict_probabilities(image))

    def map_back(self, grid_mask: np.ndarray, probs: torch.Tensor, box: VoxelBox, volume: Volume,
                 upsample: str | None = None) -> SegmentationResult:
        """The labels of :meth:`grid_labels` at the volume's resolution, 0 outside the box, with their table.

        Args:
            grid_mask: the grid's label map.
            probs: its cleaned probabilities (read by ``linear`` only).
            box: where the grid lies, in the volume's voxels.
            volume: the loaded study.
            upsample: ``nearest`` or ``linear`` (default: ``predict.upsample``).
        """
        mode = upsample or self.cfg.predict.upsample
        if mode == "nearest":
            box_mask = upsample_mask(grid_mask, box.size)
            histograms = nearest_histograms(grid_mask, box.size)
        elif mode == "linear":
            with torch.inference_mode():
                box_mask, histograms = upsample_linear(probs, box.size, self.cfg.predict.chunk_slices)
        else:
            raise ConfigError(f"predict.upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
        if box == VoxelBox.whole(volume.shape):
            mask = box_mask
        else:
            mask, histograms = place_box(box_mask, histograms, box, volume.shape)
        table = table_from_histograms(histograms, volume.slice_numbers)
        return SegmentationResult(mask=mask, vertebrae=table, grid_mask=grid_mask, box=box)

    def refine_box(self, result: SegmentationResult, volume: Volume) -> VoxelBox | None:
        """The fine box fitted to the neck a first pass labelled: centred on its labels and scaled to its
        length (``seg.masks.neck_length_mm`` over ``data.reference_neck_mm``), as training cut its boxes
        from the true labels. (The localiser's coarse box, 6-mm voxels, is only the first guess of
        :meth:`locate`: on phantoms it was up to 27 % long.) None when there is nothing to refine (no
        cascade, no reference, a neck not measured: a vertebra missing or cut by the scan's edge, or a
        first-pass C1 or C7 whose height or volume the QC calls too large for its level).

        Args:
            result: the first pass (:meth:`segment_box`).
            volume: the loaded study.
        """
        if not self.fits_box_to_neck:
            return None
        reference = self.cfg.data.reference_neck_mm
        neck_mm = neck_length_mm(result.vertebrae, volume.shape[0], volume.spacing[0])
        if neck_mm <= 0:
            return None
        # A C1 or C7 too large for its level (a C1 painted over the skull base, a C7 running into the chest)
        # would stretch and shift the box towards what is not neck: keep the first pass then. A small,
        # cut or off-column end does not count: a box too small cuts the ends it must fit, and a faint
        # end's centre is still near its level.
        verdicts = self.verdicts(result, volume)["qc"]
        ends = [f"{name} {verdict}" for name, verdict in (("C1", verdicts.iloc[0]), ("C7", verdicts.iloc[-1]))
                if too_large(verdict)]
        if ends:
            log.info("study %s: no second pass, the first pass's %s", volume.study_uid or "?", "; ".join(ends))
            return None
        rows = result.vertebrae
        centre = tuple((float(rows[f"{k}_min"].min()) + float(rows[f"{k}_max"].max())) / 2.0 for k in "zyx")
        spacing = tuple(v * size_scale(neck_mm, reference) for v in self.cfg.data.spacing)
        return VoxelBox.centred(centre, box_size(volume.spacing, self.grid, spacing))

    def verdicts(self, result: SegmentationResult, volume: Volume) -> pd.DataFrame:
        """The quality check's table of a segmentation (``seg.qc.check_vertebrae``), judged against the box
        the network saw; nothing is changed.

        Args:
            result: a segmentation of ``volume`` (:meth:`segment_box` or :meth:`segment`).
            volume: the study it describes.
        """
        box = None
        if result.box is not None and result.box != VoxelBox.whole(volume.shape):
            box = (result.box.start, result.box.size)
        return check_vertebrae(result.vertebrae, volume.spacing, volume.shape, box=box, limits=self.qc_limits)

    def check(self, result: SegmentationResult, volume: Volume) -> SegmentationResult:
        """The anatomical quality check (``seg.qc``): verdicts in the table, dropped vertebrae out of the masks.

        Args:
            result: :meth:`segment`'s output (its arrays are modified in place).
            volume: the study it describes.
        """
        table = self.verdicts(result, volume)
        for label in dropped_labels(table):
            row = table.iloc[label - 1]
            region = tuple(slice(int(row[f"{k}_min"]), int(row[f"{k}_max"]) + 1) for k in "zyx")
            part = result.mask[region]
            part[part == label] = 0
            result.grid_mask[result.grid_mask == label] = 0
        result.vertebrae = table
        return result

    def predict(self, volume: Volume, image: np.ndarray | None = None) -> SegmentationResult:
        """Segment C1..C7 in one study at its own resolution and keep only what passes the quality check.

        Args:
            volume: the loaded study.
            image: the volume already preprocessed with this segmenter's settings (see :meth:`accepts`),
                e.g. by the stage-1 cache; None computes it here.
        """
        result = self.check(self.segment(volume, image), volume)
        uid = volume.study_uid or "?"
        missing = result.vertebrae.loc[~result.vertebrae["found"], "vertebra"].tolist()
        if missing:
            log.warning("study %s: vertebrae not found: %s", uid, ", ".join(missing))
        for name, verdict in zip(result.vertebrae["vertebra"], result.vertebrae["qc"]):
            if str(verdict).startswith(DROPPED):
                log.warning("study %s: %s %s", uid, name, verdict)
        return result


def load_segmenter(
    checkpoint: str | Path | Sequence[str | Path], device: str | torch.device = "auto", amp: bool = True
) -> Segmenter:
    """Rebuild the network(s) from ``best.pt``-style checkpoints (the config travels inside each file; with the
    cascade, the localiser too).

    Args:
        checkpoint: one checkpoint, or several trained with the same grid/window (an ensemble).
        device: ``auto``, ``cpu``, ``cuda``… or a torch device.
        amp: mixed precision on GPU.
    """
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    models, cfg, extras = [], None, []
    for path in paths:
        state = load_checkpoint(path, map_location="cpu")
        if not state.get("config"):
            raise CSpineError("not a stage-1 checkpoint (it carries no config)", path)
        this = config_from_checkpoint(SegConfig, state["config"], path)
        if cfg is not None and _geometry(this) != _geometry(cfg):
            raise CSpineError("checkpoints disagree on grid/spacing/HU window; they cannot be ensembled", path)
        cfg = cfg or this
        model = build_model(this.model, num_classes(this.data.thoracic))
        model.load_state_dict(state["model"])
        models.append(model)
        extras.append(state.get("extra") or {})
    assert cfg is not None
    localiser = Localiser.from_checkpoint_extra(extras, device, paths, amp=amp) if cfg.data.cascade else None
    return Segmenter(models, cfg, device, amp=amp, localiser=localiser)


def _geometry(cfg: SegConfig) -> tuple:
    d = cfg.data
    return tuple(d.grid), tuple(d.spacing), tuple(d.hu_window), d.antialias

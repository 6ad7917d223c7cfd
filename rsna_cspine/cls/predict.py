"""Inference with one or more stage-2 checkpoints (fold ensemble): a study's crops → seven probabilities."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rsna_cspine.calibration import PatientCalibration, VertebraCalibration
from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.model import FractureClassifier, build_classifier
from rsna_cspine.config import config_from_checkpoint
from rsna_cspine.constants import TARGET_COLUMNS
from rsna_cspine.crops.extract import CropConfig, VertebraCrops, to_unit_float
from rsna_cspine.engine import autocast, cpu_has_native_bf16, load_checkpoint
from rsna_cspine.errors import ConfigError, CSpineError

log = logging.getLogger(__name__)


class FractureEnsemble:
    """Fold models that share one crop geometry; their probabilities are averaged.

    Args:
        models: classifiers with weights loaded.
        crop_config: the crop settings the models were trained on (crops must be cut with it).
        device: where the models run.
        batch_size: vertebrae per forward pass (7 = a whole study in one pass).
        amp: mixed precision on GPU.
        cpu_bf16: bfloat16 autocast on CPU; honoured only where the CPU has native bf16
            (:func:`cpu_has_native_bf16`), about 2× faster there; probabilities then differ from fp32
            by ~1e-3, so it is off by default.
        calibrations: the patient_overall fits stored with the models (one per model that has one),
            for ``aggregate.patient_overall(rule="calibrated")``.
        vertebra_calibrations: one per model (None: that model's own probabilities), applied to its logits
            before the models are averaged.
        prevalence: ``(8,)`` the mean training prevalence the models were trained on (``TARGET_COLUMNS``
            order), the fallback prior of a prediction; None when no checkpoint stores one.
    """

    def __init__(
        self,
        models: list[FractureClassifier],
        crop_config: CropConfig,
        device: torch.device,
        batch_size: int = 7,
        amp: bool = True,
        cpu_bf16: bool = False,
        calibrations: Sequence[PatientCalibration] = (),
        prevalence: np.ndarray | None = None,
        vertebra_calibrations: Sequence[VertebraCalibration | None] | None = None,
    ) -> None:
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        if vertebra_calibrations is not None and len(vertebra_calibrations) != len(models):
            raise ConfigError(f"{len(vertebra_calibrations)} vertebra calibrations for {len(models)} models")
        # channels_last lets oneDNN (CPU) and cuDNN pick their fastest convolutions; results are unchanged.
        self.models = [m.to(device).to(memory_format=torch.channels_last).eval() for m in models]
        self.crop_config = crop_config
        self.device = device
        self.batch_size = batch_size
        self.amp = amp
        self.cpu_bf16 = cpu_bf16
        self.calibrations = list(calibrations)
        self.vertebra_calibrations = list(vertebra_calibrations or [None] * len(models))
        self.prevalence = None if prevalence is None else np.asarray(prevalence, dtype=np.float64)

    @property
    def cpu_bf16(self) -> bool:
        """Whether CPU inference runs under bfloat16 autocast (False where the CPU lacks native bf16)."""
        return self._cpu_bf16

    @cpu_bf16.setter
    def cpu_bf16(self, value: bool) -> None:
        if value and not cpu_has_native_bf16():
            log.warning("cpu_bf16 requested but this CPU has no native bf16: staying in fp32")
        self._cpu_bf16 = bool(value) and cpu_has_native_bf16()

    @torch.inference_mode()
    def predict_stacks(self, images: np.ndarray, tta: bool = False, vertebrae: np.ndarray | None = None) -> np.ndarray:
        """Probabilities of a batch of stacks.

        Args:
            images: ``(B, N, C, S, S)`` as cut by ``extract_vertebra_crops`` (uint8 or float16).
            tta: also score the left-right mirrored stacks and average.
            vertebrae: ``(B,)`` 0-based vertebra of each stack (0 = C1), for models with a per-vertebra
                offset and calibrations with per-vertebra terms; None scores without the offset (and raises
                ValueError under a per-vertebra calibration).

        Returns:
            ``(B,)`` float64, the mean over models (and flips) of each model's calibrated probability.
        """
        c = self.crop_config
        expected = (c.n_slices, c.in_chans, c.size, c.size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"stacks must be (B, {', '.join(map(str, expected))}) for this ensemble, got {images.shape}")
        out = np.zeros(len(images), dtype=np.float64)
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(to_unit_float(images[start : start + self.batch_size])).to(self.device)
            which = None if vertebrae is None else torch.as_tensor(vertebrae[start : start + len(x)], device=self.device)
            views = [x, x.flip(-1)] if tta else [x]
            total = torch.zeros(len(x), device=self.device)
            for model, calibration in zip(self.models, self.vertebra_calibrations):
                for view in views:
                    # GPU: the run's amp setting; CPU: bfloat16 only when asked for (and native).
                    with autocast(self.device, self.amp if self.device.type != "cpu" else self.cpu_bf16, self.cpu_bf16):
                        logit = model(view, which)["logit"].float()
                    total += torch.sigmoid(logit if calibration is None else calibration.apply_to_logits(logit, which))
            out[start : start + len(x)] = (total / (len(self.models) * len(views))).cpu().numpy()
        return out

    def predict(self, crops: VertebraCrops, tta: bool = False) -> np.ndarray:
        """Seven vertebra probabilities of one study.

        Args:
            crops: the study's stacks, cut with ``self.crop_config``.
            tta: add left-right flipped views.

        Returns:
            ``(7,)`` float64; NaN for a vertebra absent from the mask (the caller substitutes its prior).
        """
        probs = np.full(len(crops.present), np.nan, dtype=np.float64)
        present = np.flatnonzero(crops.present)
        if len(present):
            probs[present] = self.predict_stacks(crops.images[present], tta=tta, vertebrae=present)
        return probs


def load_classifiers(
    checkpoints: list[Path], device: torch.device, batch_size: int = 7, cpu_bf16: bool = False
) -> FractureEnsemble:
    """Rebuild every checkpoint's model from the config stored in it and make an ensemble.

    Args:
        checkpoints: ``best.pt`` files written by ``train_classifier`` (one per fold).
        device: where to run them.
        batch_size: vertebrae per forward pass.
        cpu_bf16: bfloat16 autocast on CPU where it is native (see :class:`FractureEnsemble`).

    Raises:
        ConfigError: no checkpoint, or checkpoints trained on different crop settings.
    """
    if not checkpoints:
        raise ConfigError("no stage-2 checkpoint given")
    models: list[FractureClassifier] = []
    calibrations: list[PatientCalibration] = []
    vertebra_calibrations: list[VertebraCalibration | None] = []
    prevalences: list[np.ndarray] = []
    crop_config: CropConfig | None = None
    amp = True
    for path in checkpoints:
        state = load_checkpoint(path)
        if not state.get("config") or "data" not in state["config"]:
            raise CSpineError("not a stage-2 checkpoint (no stored classifier config)", path)
        cfg = config_from_checkpoint(ClsConfig, state["config"], path)
        if crop_config is None:
            crop_config, amp = cfg.data.crop, cfg.train.amp
        elif cfg.data.crop != crop_config:
            raise ConfigError(f"crop settings differ from the first checkpoint's ({crop_config})", path)
        # The checkpoint overwrites every weight: no need for (or dependency on) the pretrained file.
        model = build_classifier(cfg, load_pretrained=False)
        model.load_state_dict(state["model"])
        models.append(model)
        extra = state.get("extra") or {}
        stored_fit = extra.get("vertebra_calibration")
        vertebra_calibrations.append(VertebraCalibration.from_dict(stored_fit) if stored_fit else None)
        if extra.get("patient_calibration"):
            calibrations.append(PatientCalibration.from_dict(extra["patient_calibration"]))
        stored = extra.get("prevalence")
        if stored is not None and len(stored) == len(TARGET_COLUMNS) and np.all(np.isfinite(stored)):
            prevalences.append(np.asarray(stored, dtype=np.float64))
        log.info("loaded %s (%s, epoch %s, best score %s)", path, cfg.model.backbone, state.get("epoch"), state.get("best_score"))
    assert crop_config is not None
    if calibrations and len(calibrations) < len(models):
        log.warning("only %d of %d checkpoints carry a patient_overall calibration; using those", len(calibrations), len(models))
    if prevalences and len(prevalences) < len(models):
        log.warning("only %d of %d checkpoints store their training prevalence; the prior is their mean",
                    len(prevalences), len(models))
    return FractureEnsemble(models, crop_config, device, batch_size=batch_size, amp=amp, cpu_bf16=cpu_bf16,
                            calibrations=calibrations, prevalence=np.mean(prevalences, axis=0) if prevalences else None,
                            vertebra_calibrations=vertebra_calibrations)

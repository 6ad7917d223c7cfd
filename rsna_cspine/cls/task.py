"""Stage 2 as a :class:`~rsna_cspine.training.loop.TrainingTask`: one fold's vertebra stacks, the
competition-weighted loss, and validation scored as ``predict`` scores (patient_overall calibrated)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from rsna_cspine.aggregate import patient_overall
from rsna_cspine.calibration import (
    PatientCalibration,
    VertebraCalibration,
    cross_fit_patient_overall,
    cross_fit_vertebra_probabilities,
    fit_patient_calibration,
    fit_vertebra_calibration,
)
from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.data import VertebraDataset
from rsna_cspine.cls.loss import fracture_loss
from rsna_cspine.cls.model import build_classifier
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRA_WEIGHTS, VERTEBRAE
from rsna_cspine.engine.checkpoints import load_checkpoint
from rsna_cspine.engine.distributed import DistContext
from rsna_cspine.io.files import atomic_open
from rsna_cspine.metric import score_arrays, weighted_log_loss
from rsna_cspine.training.augment import StackAugment
from rsna_cspine.training.batches import epoch_loader, predict_batches
from rsna_cspine.training.loop import TrainingTask

log = logging.getLogger(__name__)

#: The OOF file's columns: ``patient_overall`` is the rule ``predict`` uses by default (calibrated,
#: cross-fitted inside the fold), ``patient_overall_noisy_or`` the plain rule beside it.
OOF_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", *TARGET_COLUMNS, "patient_overall_noisy_or", "fold")


@dataclass
class FoldSplit:
    """One fold's items and labels.

    Attributes:
        train: training items (present vertebrae of the training studies).
        val: validation items (present vertebrae of the validation studies).
        val_labels: the validation studies' labels, in train.csv order (the OOF file's row order).
        prior: ``(8,)`` training-set prevalences, the fallback for vertebrae the mask missed.
    """

    train: pd.DataFrame
    val: pd.DataFrame
    val_labels: pd.DataFrame
    prior: np.ndarray


def vertebra_probs(out: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """A :class:`FractureClassifier` batch output → fracture probabilities."""
    return torch.sigmoid(out["logit"].float())  # type: ignore[union-attr]


def study_predictions(items: pd.DataFrame, probs: np.ndarray, studies: list[str], prior: np.ndarray) -> np.ndarray:
    """``(n_studies, 7)`` vertebra predictions: item probabilities, the prior where a vertebra was not found.

    Args:
        items: scored items (StudyInstanceUID, vertebra).
        probs: one probability per item row.
        studies: row order of the output.
        prior: ``(8,)`` fallback.
    """
    row_of = {uid: i for i, uid in enumerate(studies)}
    out = np.tile(prior[: len(VERTEBRAE)], (len(studies), 1)).astype(np.float64)
    rows = items["StudyInstanceUID"].map(row_of).to_numpy(dtype=np.int64)  # int even when no item was scored
    out[rows, items["vertebra"].to_numpy()] = probs
    return out


@dataclass
class FoldScores:
    """What one validation pass produced.

    Attributes:
        metrics: the ``summary.csv`` columns (``val_score`` = calibrated vertebrae and patient_overall, cross-fitted).
        oof: the OOF table (:data:`OOF_COLUMNS`), with the cross-fitted calibrated values.
        vertebra_calibration: the vertebra fit on every validation vertebra (stored in the checkpoint for predict).
        calibration: the patient_overall fit on every validation study, over the vertebra-calibrated
            probabilities (stored in the checkpoint for predict).
    """

    metrics: dict[str, float]
    oof: pd.DataFrame
    vertebra_calibration: VertebraCalibration
    calibration: PatientCalibration


def score_fold(split: FoldSplit, probs: np.ndarray, fold: int) -> FoldScores:
    """Score a fold's validation predictions the way ``predict`` will use them.

    ``predict`` applies the checkpoint's vertebra calibration, then noisy-OR, then the patient_overall
    calibration. ``val_score`` scores the same chain, but each study's calibrated values come from fits on
    the other validation studies (:mod:`rsna_cspine.calibration`): a fit on the very studies it scores
    would flatter every epoch alike and pick ``best.pt`` on it. ``val_score_noisy_or`` takes plain noisy-OR
    for patient_overall; ``val_loss`` and ``val_auc`` are the model's own probabilities. The checkpoint
    stores the fits on all of them.

    Args:
        split: the fold.
        probs: one probability per ``split.val`` item.
        fold: the fold number (the OOF file's ``fold`` column).
    """
    labels = split.val["label"].to_numpy(np.float64)
    weights = np.where(labels > 0.5, VERTEBRA_WEIGHTS[1], VERTEBRA_WEIGHTS[0])
    studies = split.val_labels["StudyInstanceUID"].tolist()
    y_true = split.val_labels[list(TARGET_COLUMNS)].to_numpy(np.float64)
    item_studies = split.val["StudyInstanceUID"].astype(str).tolist()
    levels = split.val["vertebra"].to_numpy(np.int64)
    vertebrae = study_predictions(split.val, cross_fit_vertebra_probabilities(probs, labels, item_studies, levels),
                                  studies, split.prior)
    truth_overall = y_true[:, len(VERTEBRAE)]
    noisy_or = np.column_stack([vertebrae, patient_overall(vertebrae, rule="noisy_or")])
    calibrated = np.column_stack([vertebrae, cross_fit_patient_overall(vertebrae, truth_overall, studies)])
    metrics = {
        "val_loss": weighted_log_loss(labels, probs, weights) if len(labels) else float("nan"),
        "val_auc": float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else float("nan"),
        "val_score": score_arrays(y_true, calibrated),
        "val_score_noisy_or": score_arrays(y_true, noisy_or),
        "prior_score": score_arrays(y_true, np.tile(split.prior, (len(studies), 1))),
    }
    oof = pd.DataFrame(calibrated, columns=list(TARGET_COLUMNS))
    oof.insert(0, "StudyInstanceUID", studies)
    oof["patient_overall_noisy_or"] = noisy_or[:, len(VERTEBRAE)]
    oof["fold"] = fold
    vertebra_fit = fit_vertebra_calibration(probs, labels, levels) if len(labels) else VertebraCalibration.identity()
    fitted = study_predictions(split.val, vertebra_fit.apply(probs, levels), studies, split.prior)
    return FoldScores(metrics, oof, vertebra_fit, fit_patient_calibration(fitted, truth_overall))


def write_oof(path: Path, oof: pd.DataFrame) -> Path:
    """Write an OOF table (what ``rsna-cspine cv`` reads) atomically.

    Args:
        path: destination CSV.
        oof: :data:`OOF_COLUMNS`.
    """
    with atomic_open(path, "w") as fh:
        oof.reindex(columns=list(OOF_COLUMNS)).to_csv(fh, index=False)
    return path


class VertebraTask(TrainingTask):
    """One fold of stage 2.

    Args:
        cfg: the run config.
        split: the fold's items and labels.
        device: the training device.
    """

    mode = "min"

    def __init__(self, cfg: ClsConfig, split: FoldSplit, device: torch.device) -> None:
        self.cfg, self.split, self.device = cfg, split, device
        self.monitor = cfg.train.monitor
        crop = cfg.data.crop
        augment = StackAugment(cfg.aug, crop.size, crop.in_chans - int(crop.add_mask_channel)) if cfg.aug.enabled else None
        self.train_set = VertebraDataset(split.train, augment, seed=cfg.seed, in_memory=cfg.data.in_memory,
                                         paste_prob=cfg.aug.paste_prob, paste_feather=cfg.aug.paste_feather)
        self.val_set = VertebraDataset(split.val, None, in_memory=cfg.data.in_memory)
        if cfg.train.num_workers > 0:  # the workers of every epoch then share the stacks read once here
            self.train_set.preload()
        self.model = build_classifier(cfg).to(device)
        self.has_validation = cfg.fold >= 0 and len(split.val_labels) > 0
        self.oof_path = Path(cfg.run_dir) / f"oof_fold{cfg.fold}.csv"
        self._last: FoldScores | None = None

    def train_loader(self, epoch: int, ctx: DistContext) -> torch.utils.data.DataLoader:
        t = self.cfg.train
        return epoch_loader(self.train_set, t.batch_size, self.cfg.seed, epoch, t.num_workers, ctx)

    def inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The stacks and each stack's vertebra index (for the per-vertebra logit offset)."""
        return batch["image"].to(device, non_blocking=True), batch["vertebra"].to(device)

    def loss(self, outputs: dict[str, torch.Tensor | None], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total, _ = fracture_loss(outputs["logit"], batch["label"].to(self.device),  # type: ignore[arg-type]
                                 outputs["slice_logits"], batch["slice_labels"].to(self.device),
                                 self.cfg.train.slice_loss_weight)
        return total

    def predict(self, model: torch.nn.Module) -> np.ndarray:
        """Probabilities of the validation items."""
        t = self.cfg.train
        return predict_batches(model, self.val_set, t.val_batch_size, self.device, t.amp, self.inputs, vertebra_probs,
                               t.num_workers)

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        self._last = score_fold(self.split, self.predict(model), self.cfg.fold)
        return self._last.metrics

    def on_best(self) -> None:
        if self.has_validation and self._last is not None:
            write_oof(self.oof_path, self._last.oof)

    def finish(self, best_path: Path) -> None:
        if not (self.has_validation and best_path.is_file()):
            return
        # Re-score with best.pt so the OOF file always matches the checkpoint the CV and ensemble use.
        best_model = build_classifier(self.cfg, load_pretrained=False).to(self.device)
        load_checkpoint(best_path, model=best_model, map_location=self.device)
        scores = score_fold(self.split, self.predict(best_model), self.cfg.fold)
        write_oof(self.oof_path, scores.oof)
        log.info("best model: %s; out-of-fold predictions in %s",
                 {k: round(v, 4) for k, v in scores.metrics.items()}, self.oof_path)

    def checkpoint_extra(self) -> dict[str, Any]:
        # Fitted on the validation of the weights being saved, so each checkpoint carries its own fit.
        # The training studies' prevalence travels with the weights: the prior a prediction falls back on.
        extra: dict[str, Any] = {"fold": self.cfg.fold, "prevalence": [float(v) for v in self.split.prior]}
        if self._last is not None:
            extra["vertebra_calibration"] = self._last.vertebra_calibration.to_dict()
            extra["patient_calibration"] = self._last.calibration.to_dict()
        return extra

"""The 2D image-folder mode as a :class:`~rsna_cspine.training.loop.TrainingTask`: the image splits, the
model, its loss (cross-entropy, or binary cross-entropy on "class > k" for an ordinal model), validation
metrics of every view (per image, per study, present vs absent), and the val/test reports written from
``best.pt`` at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from rsna_cspine.engine.checkpoints import load_checkpoint
from rsna_cspine.engine.distributed import DistContext
from rsna_cspine.errors import ConfigError
from rsna_cspine.training.augment import StackAugment
from rsna_cspine.training.batches import epoch_loader, predict_batches
from rsna_cspine.training.loop import TrainingTask
from rsna_cspine.twod.config import METRICS, MONITORS, VIEWS, TwoDConfig
from rsna_cspine.twod.data import ImageDataset, ImageIndex, ImageTransform
from rsna_cspine.twod.model import ImageClassifier, build_image_classifier
from rsna_cspine.twod.report import classification_metrics, negative_index, positive_index, write_split_report
from rsna_cspine.twod.studies import prediction_views

log = logging.getLogger(__name__)


#: What each view's report is called, after the split's name.
_VIEW_FILES: dict[str, str] = {"": "", "binary_": "_binary", "study_": "_study", "study_binary_": "_study_binary"}
_VIEW_TITLES: dict[str, str] = {"": "images", "binary_": "images, fracture present vs absent", "study_": "studies",
                                "study_binary_": "studies, fracture present vs absent"}


def monitor_view(monitor: str) -> str:
    """The view (``""``, ``binary_``, ``study_``, ``study_binary_``) a ``val_...`` metric belongs to."""
    for view in sorted(VIEWS, key=len, reverse=True):
        if monitor.startswith(f"val_{view}") and monitor[len(f"val_{view}"):] in METRICS:
            return view
    raise ConfigError(f"train.monitor must be one of {MONITORS}, got {monitor!r}")


def ordinal_targets(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(B,)`` class numbers → ``(B, K-1)`` 0/1 targets of "class > k" (an ordinal model's outputs)."""
    thresholds = torch.arange(n_classes - 1, device=target.device)
    return (target[:, None] > thresholds[None]).float()


class _Images:
    """The ``image`` tensors of a loader, on the device: what ``torch.optim.swa_utils.update_bn`` iterates."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):  # noqa: ANN204 - a plain generator of tensors
        for batch in self.loader:
            yield batch["image"].to(self.device, non_blocking=True)


class ImageTask(TrainingTask):
    """The 2D mode as a :class:`~rsna_cspine.training.loop.TrainingTask`.

    Args:
        cfg: the run config.
        index: the readable images and the class names.
        splits: row numbers of ``index.frame`` per split.
        images: decoded images in ``index.frame`` order, or None (decoded on the fly).
        device: the training device.
        run_dir: the run folder (reports go to ``run_dir/report``).
        transform: the column mask applied to images decoded on the fly (``images`` come masked), or None.
        extra: facts stored in every checkpoint (the column U-Net of ``data.mask_with``).
    """

    def __init__(
        self,
        cfg: TwoDConfig,
        index: ImageIndex,
        splits: dict[str, np.ndarray],
        images: list[np.ndarray] | None,
        device: torch.device,
        run_dir: Path,
        transform: ImageTransform | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.index, self.device, self.run_dir = cfg, index, device, run_dir
        self.classes = index.classes
        self.extra = dict(extra or {})
        self.monitor, self.mode = cfg.train.monitor, cfg.monitor_mode
        self.has_studies = index.has_studies
        available = {""} | ({"study_"} if self.has_studies else set())
        if negative_index(self.classes, cfg.data.negative_class) is not None:
            available |= {f"{view}binary_" for view in available}
        view = monitor_view(self.monitor)
        if view not in available:
            need = [n for n, wanted, there in (
                ("studies of several images", "study" in view, self.has_studies),
                ("a negative class among three or more classes", "binary" in view, "binary_" in available),
            ) if wanted and not there]
            raise ConfigError(f"train.monitor {self.monitor!r} needs {' and '.join(need)}; this dataset's views give "
                              f"{sorted(f'val_{v}loss' for v in available)} and the other metrics of each")
        d = cfg.data
        self.frames = {name: index.frame.iloc[rows].reset_index(drop=True) for name, rows in splits.items()}
        augment = StackAugment(cfg.aug, d.image_size, d.in_chans) if cfg.aug.enabled else None
        self.datasets = {
            name: ImageDataset(
                self.frames[name], d.in_chans, d.image_size, d.dicom_window,
                augment=augment if name == "train" else None, seed=cfg.seed,
                images=None if images is None else [images[i] for i in rows], transform=transform,
            )
            for name, rows in splits.items()
        }
        self.datasets["train_clean"] = ImageDataset(
            self.frames["train"], d.in_chans, d.image_size, d.dicom_window, seed=cfg.seed,
            images=self.datasets["train"].images, transform=transform,
        )
        self.train_set = self.datasets["train"]
        self.has_validation = len(self.frames["val"]) > 0
        self.model = build_image_classifier(cfg, len(self.classes)).to(device)
        weights = None
        if cfg.train.class_weighted:
            counts = np.bincount(self.frames["train"]["target"], minlength=len(self.classes)).astype(np.float64)
            weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        self.class_weights = weights

    def train_loader(self, epoch: int, ctx: DistContext) -> DataLoader:
        t = self.cfg.train
        return epoch_loader(self.train_set, t.batch_size, self.cfg.seed, epoch, t.num_workers, ctx)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch["target"].to(self.device)
        if self.cfg.model.ordinal:
            # CORAL's loss: binary cross-entropy of every "class > k" output; class weights weigh the items.
            per_item = F.binary_cross_entropy_with_logits(
                outputs.float(), ordinal_targets(target, len(self.classes)), reduction="none").sum(1)
            if self.class_weights is None:
                return per_item.mean()
            weights = self.class_weights[target]
            return (per_item * weights).sum() / weights.sum()
        return F.cross_entropy(
            outputs.float(), target, weight=self.class_weights, label_smoothing=self.cfg.train.label_smoothing,
        )

    def _probs(self, model: torch.nn.Module, split: str) -> np.ndarray:
        t = self.cfg.train
        to_probs = unwrap_classifier(model).class_probs
        return predict_batches(model, self.datasets[split], t.val_batch_size, self.device, t.amp, self.inputs,
                               to_probs, t.num_workers)

    def _recalibrate_batchnorm(self, model: torch.nn.Module) -> None:
        """Re-estimate BatchNorm running statistics on clean training images (see ``bn_recalibration_images``).

        The images are evenly spaced over the training split and the pass uses no randomness, so every rank
        gets the same statistics and a resumed run the same as an uninterrupted one.
        """
        limit = self.cfg.train.bn_recalibration_images
        if limit <= 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return
        clean = self.datasets["train_clean"]
        picked = np.unique(np.linspace(0, len(clean) - 1, min(limit, len(clean))).round().astype(int))
        loader = DataLoader(Subset(clean, picked.tolist()), batch_size=self.cfg.train.val_batch_size, shuffle=False,
                            num_workers=self.cfg.train.num_workers)
        with torch.no_grad():
            update_bn(_Images(loader, self.device), model)  # a cumulative average over the picked images

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        self._recalibrate_batchnorm(model)
        views = prediction_views(self.frames["val"], self._probs(model, "val"), self.classes, self.cfg.data,
                                 self.has_studies)
        out: dict[str, float] = {}
        for prefix, view in views.items():
            metrics = classification_metrics(view.frame["target"].to_numpy(), view.probs, view.classes,
                                             view.positive_class)
            out.update({f"val_{prefix}{k}": float(v) for k, v in metrics.items() if f"val_{prefix}{k}" in MONITORS})
        return out

    def on_best(self) -> None:
        """Nothing to keep per epoch: the reports are written from ``best.pt`` in :meth:`finish`."""

    def finish(self, best_path: Path) -> None:
        model = self.model
        if best_path.is_file():
            model = build_image_classifier(self.cfg, len(self.classes), load_pretrained=False).to(self.device)
            load_checkpoint(best_path, model=model, map_location=self.device)
        report_dir = self.run_dir / "report"
        results = {}
        for split in ("val", "test"):
            if not len(self.frames[split]):
                continue
            views = prediction_views(self.frames[split], self._probs(model, split), self.classes, self.cfg.data,
                                     self.has_studies)
            for prefix, view in views.items():
                name = f"{split}{_VIEW_FILES[prefix]}"
                results[name] = write_split_report(
                    report_dir, name, view.frame, view.probs, view.classes, view.positive_class,
                    id_column=view.id_column, title=f"{split} split: {len(view.frame)} {_VIEW_TITLES[prefix]}",
                )
        d = self.cfg.data
        study_rule = (f"; a study's probabilities: the {d.study_agg} over its "
                      f"{f'middle {d.middle_k}' if d.middle_k else 'every'} image(s)" if self.has_studies else "")
        sections = [f"# 2D classifier report\n\nRun `{self.run_dir}`; model from `{best_path.name}`; backbone "
                    f"`{self.cfg.model.backbone}`; classes {', '.join(f'`{c}`' for c in self.classes)}{study_rule}."]
        sections += [(report_dir / f"{name}_report.md").read_text(encoding="utf-8") for name in results]
        sections.append("## Training curves\n\n![curves](../curves.png)")
        (report_dir / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
        for split, result in results.items():
            log.info("%s: %s", split, {k: round(v, 4) for k, v in result["metrics"].items()})
        log.info("reports in %s", report_dir)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "positive_class": self.classes[positive_index(self.classes, self.cfg.data.positive_class)],
            "split": self.cfg.split.mode,
            "fold": self.cfg.fold if self.cfg.split.mode == "kfold" else None,
            **self.extra,
        }


def unwrap_classifier(model: torch.nn.Module) -> ImageClassifier:
    """The :class:`ImageClassifier` inside a DDP wrapper or a weight average (``module``), or the model itself."""
    while not isinstance(model, ImageClassifier) and hasattr(model, "module"):
        model = model.module
    return model  # type: ignore[return-value]

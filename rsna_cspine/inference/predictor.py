"""One study at a time: a CT study → eight probabilities, through public steps that return what they made.

:class:`FracturePipeline` loads the models of a models folder once. Its steps, each usable on its own:

* :meth:`~FracturePipeline.load`: DICOM folder, Enhanced CT file or NIfTI file → :class:`~rsna_cspine.io.volume.Volume`;
* :meth:`~FracturePipeline.segment`: Volume → :class:`~rsna_cspine.seg.predict.SegmentationResult`
  (mask at the volume's resolution + per-vertebra table);
* :meth:`~FracturePipeline.crop`: Volume + segmentation → :class:`~rsna_cspine.crops.extract.VertebraCrops`;
* :meth:`~FracturePipeline.classify`: crops → seven probabilities (NaN where a vertebra was not found);
* :meth:`~FracturePipeline.aggregate`: seven → eight clipped probabilities (absent vertebrae take the prior).

:meth:`~FracturePipeline.predict_study` composes them, times them, turns any failure into a
:class:`StudyFailure` naming the stage, and on request keeps the intermediates (``explain`` draws
them without running the study twice).

Models folder layout (what ``submission/build_bundle.py`` ships)::

    MODELS/seg/**/best.pt   or  MODELS/seg/*.pt   stage-1 checkpoints (several are averaged)
    MODELS/cls/**/best.pt   or  MODELS/cls/*.pt   stage-2 checkpoints, one per fold (averaged)

``last.pt`` files are never used. Each checkpoint carries its resolved training config, which rebuilds
the network and, for stage 2, the crop geometry it was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rsna_cspine.aggregate import study_probabilities
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.engine.checkpoints import find_checkpoints
from rsna_cspine.errors import ConfigError
from rsna_cspine.inference.config import PipelineConfig
from rsna_cspine.io.volume import study_name
from rsna_cspine.metric import prior_predictions
from rsna_cspine.runner import StudyError, file_fingerprint

if TYPE_CHECKING:  # torch-heavy modules are imported when the models load, not with this module
    from rsna_cspine.cls.predict import FractureEnsemble
    from rsna_cspine.crops.extract import VertebraCrops
    from rsna_cspine.io.volume import Volume
    from rsna_cspine.seg.predict import SegmentationResult, Segmenter

logger = logging.getLogger(__name__)

#: The timed steps of one study, in order.
STAGES: tuple[str, ...] = ("load", "segment", "crop", "classify")
#: ``full``: every fold (+ TTA if configured); ``cheap``: the first stage-1 model and ``cheap_folds`` folds.
PREDICTION_PATHS: tuple[str, ...] = ("full", "cheap")
#: Bumped when the meaning of a stored prediction changes, so earlier parts are not resumed.
PREDICTION_VERSION = 2


@dataclass
class StudyIntermediates:
    """What the steps made for one study (kept only when asked: the volume is the largest array).

    Attributes:
        volume: the loaded series.
        segmentation: stage 1's mask and vertebra table.
        crops: the 2.5D stacks the classifier saw.
    """

    volume: Volume
    segmentation: SegmentationResult
    crops: VertebraCrops


@dataclass
class StudyPrediction:
    """What the pipeline says about one study.

    Attributes:
        uid: the study's name: its folder's name (the StudyInstanceUID in the Kaggle layout), or its file's
            name without ``.nii.gz``/``.nii``/``.dcm``.
        probs: ``(8,)`` clipped probabilities in ``TARGET_COLUMNS`` order.
        vertebra_probs: ``(7,)`` the classifier's output before filling; NaN where a vertebra was not found.
        path: ``full`` or ``cheap``.
        timings: seconds per stage (``load``, ``segment``, ``crop``, ``classify``) and ``total``.
        n_slices: slices in the loaded series.
        warnings: notes about the study (loader repairs, vertebrae not found or dropped by stage 1's quality
            check and given the prior).
        intermediates: the steps' results, when ``predict_study`` was asked to keep them.
        qc: stage 1's quality check in one line (``seg.qc.qc_summary``: kept, absent, dropped and why).
    """

    uid: str
    probs: np.ndarray
    vertebra_probs: np.ndarray
    path: str
    timings: dict[str, float]
    n_slices: int = 0
    warnings: list[str] = field(default_factory=list)
    intermediates: StudyIntermediates | None = None
    qc: str = ""

    @property
    def vertebrae_found(self) -> int:
        return int(np.isfinite(self.vertebra_probs).sum())


class StudyFailure(StudyError):
    """One study could not be predicted; ``stage`` says where (load, segment, crop, classify)."""

    def __init__(self, message: str, path: str | Path | None = None, stage: str = "") -> None:
        super().__init__(message, path)
        self.stage = stage


class FracturePipeline:
    """Stage 1 + stage 2 + aggregation, loaded once and applied study by study.

    Build it with :meth:`from_models_dir`; :meth:`predict_study` turns one DICOM folder into a
    :class:`StudyPrediction`.

    Args:
        seg_checkpoints: stage-1 checkpoints; the full path averages them, the cheap path uses the first.
        classifier_checkpoints: stage-2 fold checkpoints; the full path averages them all, the cheap
            path the first ``cfg.cheap_folds``.
        cfg: pipeline settings (defaults when ``None``).
        prior: ``(8,)`` fallback probabilities (absent vertebrae, failed studies); default the training
            prevalence the stage-2 checkpoints store (their mean), else, for checkpoints written before they
            stored it, the real train.csv prevalence (with a warning).
    """

    def __init__(
        self,
        seg_checkpoints: list[Path],
        classifier_checkpoints: list[Path],
        cfg: PipelineConfig | None = None,
        prior: np.ndarray | None = None,
    ) -> None:
        from rsna_cspine.engine import resolve_device

        self.cfg = cfg or PipelineConfig()
        self.cfg.validate()
        if not seg_checkpoints or not classifier_checkpoints:
            raise ConfigError("at least one stage-1 and one stage-2 checkpoint are needed")
        self.seg_checkpoints = [Path(p) for p in seg_checkpoints]
        self.classifier_checkpoints = [Path(p) for p in classifier_checkpoints]
        self.device = resolve_device(self.cfg.device)
        logger.info(
            "models: stage 1 %s; stage 2 %s; device %s",
            [str(p) for p in self.seg_checkpoints],
            [str(p) for p in self.classifier_checkpoints],
            self.device,
        )
        self._segmenters: dict[str, Segmenter] = {}
        self._ensembles: dict[str, FractureEnsemble] = {}
        # The crop geometry must be the one the classifiers were trained on: it travels in their checkpoints.
        self.crop_config = self.classifiers("full").crop_config
        self.calibrations = self.classifiers("full").calibrations
        self.prior = self.models_prior() if prior is None else np.asarray(prior, dtype=np.float64)
        if self.cfg.rule == "calibrated" and not self.calibrations:
            logger.warning("rule 'calibrated': no stage-2 checkpoint carries a patient_overall calibration "
                           "(trained before they were stored); using plain noisy_or")
        self.segmenter("full")

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | Path,
        cfg: PipelineConfig | None = None,
        prior: np.ndarray | None = None,
    ) -> FracturePipeline:
        """Load every model of a models folder (see the module docstring for its layout).

        Args:
            models_dir: folder with ``seg/`` and ``cls/`` checkpoints.
            cfg: pipeline settings (defaults when ``None``).
            prior: ``(8,)`` fallback; default the models' stored training prevalence (see the class).
        """
        return cls(find_checkpoints(models_dir, "seg"), find_checkpoints(models_dir, "cls"), cfg, prior)

    def models_prior(self) -> np.ndarray:
        """``(8,)`` the training prevalence stored in the stage-2 checkpoints (their mean); the real train.csv
        prevalence, with a warning, when none stores one (checkpoints written before they did)."""
        stored = self.classifiers("full").prevalence
        if stored is None:
            logger.warning("no stage-2 checkpoint stores its training prevalence (trained before they did): "
                           "the fallback prior is the real train.csv prevalence")
            return prior_predictions(None)
        return stored

    # ------------------------------------------------------------------------------------------
    # The models of each path
    # ------------------------------------------------------------------------------------------

    def segmenter(self, path: str = "full") -> Segmenter:
        """Stage 1 of a path: every checkpoint on the full path, the first one on the cheap path.

        Args:
            path: ``full`` or ``cheap``.
        """
        if "full" not in self._segmenters:
            from rsna_cspine.seg.predict import load_segmenter

            self._segmenters["full"] = load_segmenter(self.seg_checkpoints, self.device)
        full = self._segmenters["full"]
        if path == "full" or len(full.models) == 1:
            return full
        if path not in self._segmenters:
            from rsna_cspine.seg.predict import Segmenter

            # The networks are already in memory: the cheap path shares them instead of loading copies.
            self._segmenters[path] = Segmenter(full.models[:1], full.cfg, self.device, amp=full.amp)
        return self._segmenters[path]

    def classifiers(self, path: str = "full") -> FractureEnsemble:
        """Stage 2 of a path: every fold on the full path, the first ``cheap_folds`` on the cheap path.

        Args:
            path: ``full`` or ``cheap``.
        """
        if "full" not in self._ensembles:
            from rsna_cspine.cls.predict import load_classifiers

            self._ensembles["full"] = load_classifiers(self.classifier_checkpoints, self.device, cpu_bf16=self.cfg.cpu_bf16)
        full = self._ensembles["full"]
        if path == "full" or len(full.models) <= self.cfg.cheap_folds:
            return full
        if path not in self._ensembles:
            from rsna_cspine.cls.predict import FractureEnsemble

            self._ensembles[path] = FractureEnsemble(
                full.models[: self.cfg.cheap_folds], full.crop_config, self.device, batch_size=full.batch_size, amp=full.amp,
                cpu_bf16=full.cpu_bf16, vertebra_calibrations=full.vertebra_calibrations[: self.cfg.cheap_folds],
            )
        return self._ensembles[path]

    def fingerprint(self) -> dict[str, Any]:
        """What decides the predictions: model files, prior and settings (resume reuses parts only if equal)."""
        settings = dataclasses.asdict(self.cfg)
        for volatile in ("device", "time_budget_s", "budget_safety", "resume"):
            settings.pop(volatile)
        return {
            "version": PREDICTION_VERSION,
            "seg": [file_fingerprint(p) for p in self.seg_checkpoints],
            "cls": [file_fingerprint(p) for p in self.classifier_checkpoints],
            "prior": [round(float(v), 12) for v in self.prior],
            "settings": settings,
        }

    # ------------------------------------------------------------------------------------------
    # The steps
    # ------------------------------------------------------------------------------------------

    def load(self, folder: str | Path) -> Volume:
        """Read a study: a folder of DICOM files, an Enhanced CT file or a NIfTI file (see ``io.study.load_study``).

        Args:
            folder: the study's folder (``test_images/<UID>``) or file.
        """
        from rsna_cspine.io.study import load_study

        return load_study(folder)

    def segment(self, volume: Volume, path: str = "full") -> SegmentationResult:
        """Stage 1: the C1..C7 mask at the volume's resolution and the per-vertebra table, after the anatomical
        quality check (``seg.qc``): a vertebra it dropped is not in the mask, so it is never cropped and takes
        the prior; the table's ``qc`` says why.

        Args:
            volume: the loaded study.
            path: ``full`` or ``cheap``.
        """
        return self.segmenter(path).predict(volume)

    def crop(self, volume: Volume, segmentation: SegmentationResult) -> VertebraCrops:
        """The per-vertebra 2.5D stacks, cut with the crop geometry the classifiers were trained on.

        Args:
            volume: the loaded study.
            segmentation: its stage-1 result.
        """
        from rsna_cspine.crops.extract import extract_vertebra_crops

        return extract_vertebra_crops(volume.hu, segmentation.mask, self.crop_config, spacing=volume.spacing)

    def classify(self, crops: VertebraCrops, path: str = "full") -> np.ndarray:
        """Stage 2: the fold ensemble's probability for each vertebra (TTA on the full path if configured).

        Args:
            crops: the study's stacks.
            path: ``full`` or ``cheap``.

        Returns:
            ``(7,)`` float64; NaN where the vertebra is absent from the crops.
        """
        tta = self.cfg.tta and path == "full"
        raw = np.asarray(self.classifiers(path).predict(crops, tta=tta), dtype=np.float64)
        if raw.shape != (len(VERTEBRAE),):
            raise ValueError(f"ensemble returned shape {raw.shape}, expected ({len(VERTEBRAE)},)")
        return np.where(np.asarray(crops.present, dtype=bool), raw, np.nan)

    def aggregate(self, vertebra_probs: np.ndarray) -> np.ndarray:
        """Seven classifier outputs (NaN = not found) → eight clipped probabilities.

        Args:
            vertebra_probs: ``(7,)``; a non-finite entry takes that vertebra's prior.
        """
        rule = "noisy_or" if self.cfg.rule == "calibrated" and not self.calibrations else self.cfg.rule
        return study_probabilities(vertebra_probs, self.prior, rule, self.cfg.blend_weight, self.calibrations)

    def predict_study(
        self,
        folder: str | Path,
        path: str = "full",
        *,
        keep_intermediates: bool = False,
        on_stage: Callable[[str], None] | None = None,
    ) -> StudyPrediction:
        """Predict one study: load → segment → crop → classify → aggregate.

        Args:
            folder: the study's folder of DICOM files (``test_images/<UID>``), Enhanced CT file or NIfTI file.
            path: ``full`` (every fold, TTA if configured) or ``cheap`` (``cheap_folds`` folds, no TTA).
            keep_intermediates: return the volume, segmentation and crops in ``intermediates``
                (otherwise the volume and mask are dropped before the classifier runs).
            on_stage: called with each stage's name as it starts (progress reports).

        Raises:
            StudyFailure: a stage failed; ``stage`` names it and the message the cause.
        """
        if path not in PREDICTION_PATHS:
            raise ValueError(f"path must be one of {PREDICTION_PATHS}, got {path!r}")
        folder = Path(folder)
        announce = on_stage or (lambda stage: None)
        timings: dict[str, float] = {}
        kept = None
        stage = "load"
        start = time.perf_counter()
        try:
            announce(stage)
            volume = self.load(folder)
            timings["load"] = time.perf_counter() - start
            notes = list(volume.warnings)
            n_slices = volume.shape[0]

            stage, tick = "segment", time.perf_counter()
            announce(stage)
            segmentation = self.segment(volume, path)
            timings["segment"] = time.perf_counter() - tick

            qc, table = segmentation.qc, segmentation.vertebrae
            verdicts = table["qc"] if "qc" in table else [""] * len(table)
            dropped = {str(v): str(q).partition(": ")[2] for v, q in zip(table["vertebra"], verdicts)
                       if str(q).startswith("dropped")}

            stage, tick = "crop", time.perf_counter()
            announce(stage)
            crops = self.crop(volume, segmentation)
            if keep_intermediates:
                kept = StudyIntermediates(volume, segmentation, crops)
            # The volume and mask are the big arrays; drop them before the classifier allocates its own.
            del volume, segmentation
            timings["crop"] = time.perf_counter() - tick

            stage, tick = "classify", time.perf_counter()
            announce(stage)
            raw = self.classify(crops, path)
            timings["classify"] = time.perf_counter() - tick
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure of any stage is this study's failure;
            # BaseException because Rust decoders (pylibjpeg-rle) raise pyo3's PanicException, not an Exception.
            raise StudyFailure(f"{stage} failed: {exc.__class__.__name__}: {exc}", folder, stage) from exc
        present = np.asarray(crops.present, dtype=bool)
        broken = present & ~np.isfinite(raw)
        if broken.any():
            notes.append(f"non-finite classifier output for {[VERTEBRAE[i] for i in np.flatnonzero(broken)]}: prior used")
        absent = [VERTEBRAE[i] for i in np.flatnonzero(~present) if VERTEBRAE[i] not in dropped]
        if absent:
            notes.append(f"vertebrae not found: {absent}: prior used")
        notes += [f"{name} dropped by stage 1's quality check ({reason}): prior used" for name, reason in dropped.items()]
        timings["total"] = time.perf_counter() - start
        return StudyPrediction(
            uid=study_name(folder),
            probs=self.aggregate(raw),
            vertebra_probs=raw,
            path=path,
            timings=timings,
            n_slices=n_slices,
            warnings=notes,
            intermediates=kept,
            qc=qc,
        )

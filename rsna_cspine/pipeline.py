"""End to end: a study folder → eight probabilities, and test.csv → a complete, valid submission.

One :class:`FracturePipeline` is built from a models folder (layout below) and predicts one study at a
time: load the DICOM series → stage-1 vertebra masks → per-vertebra 2.5D crops → stage-2 fold ensemble →
patient_overall by a configurable rule. :func:`predict_dataset` runs it over the studies of test.csv (never
a directory listing), survives any per-study failure (that study gets the prior), keeps to a time
budget, can run one shard of the studies, resumes after an interruption, and always writes a complete
submission. :func:`merge_shards` joins shard files into one submission.

Models folder layout (what ``submission/build_bundle.py`` ships)::

    MODELS/seg/**/best.pt   or  MODELS/seg/*.pt   stage-1 checkpoints (several are averaged)
    MODELS/cls/**/best.pt   or  MODELS/cls/*.pt   stage-2 checkpoints, one per fold (averaged)

``last.pt`` files are never used. Each checkpoint carries its resolved training config, which rebuilds
the network and, for stage 2, the crop geometry it was trained on.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rsna_cspine.aggregate import PATIENT_RULES, build_submission, clip_probabilities, patient_overall, write_submission
from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.errors import ConfigError, CSpineError, LayoutError, SubmissionError
from rsna_cspine.io.kaggle import KaggleLayout, check_test_frame, read_test_csv, read_train_labels, test_studies
from rsna_cspine.metric import prior_predictions

logger = logging.getLogger(__name__)

#: How a study is predicted: every fold (+TTA), the cheap path (fewer folds, no TTA), or the prior.
PATHS: tuple[str, ...] = ("full", "cheap", "prior")
STAGES: tuple[str, ...] = ("load", "segment", "crop", "classify")
TIMING_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID",
    "path",
    "status",
    *(f"{stage}_s" for stage in STAGES),
    "total_s",
    "n_slices",
    "vertebrae_found",
    "resumed",
    "reason",
)
SHARD_FORMAT = "rsna-cspine-shard/1"
_PARTS_VERSION = 1


@dataclass
class PipelineConfig:
    """How studies are predicted and aggregated; settable from YAML and ``key=value`` overrides.

    Attributes:
        rule: patient_overall rule over the seven (prior-filled) vertebra probabilities; one of
            ``aggregate.PATIENT_RULES``. ``calibrated`` (default): noisy-OR through the Platt fits that
            the stage-2 checkpoints carry from their validation folds, averaged; checkpoints without
            one fall back to plain ``noisy_or`` (logged). ``noisy_or``, ``max``, ``mean_top``, ``blend``:
            fixed rules.
        blend_weight: weight of noisy-OR in the ``blend`` rule (the rest is ``max``).
        device: ``auto``, ``cpu`` or ``cuda[:k]``.
        tta: average the classifier over a horizontal flip on the full path.
        cpu_bf16: run stage 2 under bfloat16 autocast on CPU (≈ 1.4× faster there); honoured only where
            the CPU has native bf16, fp32 elsewhere. Probabilities move by ~1e-3, so it is part of the
            resume fingerprint.
        time_budget_s: wall-clock limit of the whole run (model loading included); ``None`` = no limit,
            ``0`` = every study gets the prior. Studies switch to the cheap path, then the prior, when the
            median time per study says the rest would not fit.
        budget_safety: the time estimates are multiplied by this before comparing with the time left.
        cheap_folds: how many classifier checkpoints the cheap path uses (no TTA).
        prior: fallback probabilities: ``train_csv`` = the prevalence of ``<data>/train.csv`` when it
            exists (on Kaggle that is the real prevalence), else the real prevalence; ``real`` = always
            ``constants.REAL_PREVALENCE``.
        resume: skip studies already predicted into ``<out>.parts/`` by an earlier run with the same
            models and settings.
        split: which image folder of the Kaggle layout holds the studies (``test`` or ``train``).
    """

    rule: str = "calibrated"
    blend_weight: float = 0.5
    device: str = "auto"
    tta: bool = False
    cpu_bf16: bool = False
    time_budget_s: float | None = None
    budget_safety: float = 1.2
    cheap_folds: int = 1
    prior: str = "train_csv"
    resume: bool = True
    split: str = "test"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a value that cannot work."""
        if self.rule not in PATIENT_RULES:
            raise ConfigError(f"rule must be one of {PATIENT_RULES}, got {self.rule!r}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ConfigError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ConfigError(f"time_budget_s must be ≥ 0 (or null for no limit), got {self.time_budget_s}")
        if self.budget_safety < 1.0:
            raise ConfigError(f"budget_safety must be ≥ 1, got {self.budget_safety}")
        if self.cheap_folds < 1:
            raise ConfigError(f"cheap_folds must be ≥ 1, got {self.cheap_folds}")
        if self.prior not in ("train_csv", "real"):
            raise ConfigError(f"prior must be 'train_csv' or 'real', got {self.prior!r}")
        if self.split not in ("test", "train"):
            raise ConfigError(f"split must be 'test' or 'train', got {self.split!r}")


@dataclass
class StudyPrediction:
    """What the pipeline says about one study.

    Attributes:
        uid: StudyInstanceUID (the folder name).
        probs: ``(8,)`` clipped probabilities in ``TARGET_COLUMNS`` order.
        vertebra_probs: ``(7,)`` the classifier's output before filling; NaN where a vertebra was not found.
        path: ``full`` or ``cheap``.
        timings: seconds per stage (``load``, ``segment``, ``crop``, ``classify``) and ``total``.
        n_slices: slices in the loaded series.
        warnings: notes about the study (loader repairs, vertebrae not found and given the prior).
    """

    uid: str
    probs: np.ndarray
    vertebra_probs: np.ndarray
    path: str
    timings: dict[str, float]
    n_slices: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def vertebrae_found(self) -> int:
        return int(np.isfinite(self.vertebra_probs).sum())


class StudyFailure(CSpineError):
    """One study could not be predicted; ``stage`` says where (load, segment, crop, classify)."""

    def __init__(self, message: str, path: str | Path | None = None, stage: str = "") -> None:
        super().__init__(message, path)
        self.stage = stage


# ----------------------------------------------------------------------------------------------
# Models folder
# ----------------------------------------------------------------------------------------------


def find_checkpoints(models_dir: str | Path, stage: str) -> list[Path]:
    """Checkpoints of one stage in a models folder, in a stable (sorted) order.

    Args:
        models_dir: the models folder.
        stage: ``seg`` or ``cls``.

    Returns:
        ``<models>/<stage>/**/best.pt`` and ``<models>/<stage>/*.pt`` (never ``last.pt``), sorted by path.
    """
    folder = Path(models_dir) / stage
    if not folder.is_dir():
        raise LayoutError(f"no '{stage}' folder (expected {stage}/**/best.pt or {stage}/*.pt)", Path(models_dir))
    found = set(folder.rglob("best.pt")) | {p for p in folder.glob("*.pt") if p.name != "last.pt"}
    found = {p for p in found if p.is_file()}
    if not found:
        raise LayoutError(f"no checkpoint: expected {stage}/**/best.pt or {stage}/*.pt", folder)
    return sorted(found)


def _file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# ----------------------------------------------------------------------------------------------
# One study
# ----------------------------------------------------------------------------------------------


class FracturePipeline:
    """Stage 1 + stage 2 + aggregation, loaded once and applied study by study.

    Build it with :meth:`from_models_dir`; :meth:`predict_study` turns one DICOM folder into a
    :class:`StudyPrediction`.
    """

    def __init__(
        self,
        seg_checkpoints: list[Path],
        classifier_checkpoints: list[Path],
        cfg: PipelineConfig | None = None,
        prior: np.ndarray | None = None,
    ) -> None:
        """Load the networks of both stages.

        Args:
            seg_checkpoints: stage-1 checkpoints; the full path averages them, the cheap path uses the first.
            classifier_checkpoints: stage-2 fold checkpoints; the full path averages them all, the cheap
                path the first ``cfg.cheap_folds``.
            cfg: pipeline settings (defaults when ``None``).
            prior: ``(8,)`` fallback probabilities (absent vertebrae, failed studies); default the real
                train.csv prevalence.
        """
        from rsna_cspine.engine import resolve_device

        self.cfg = cfg or PipelineConfig()
        self.cfg.validate()
        if not seg_checkpoints or not classifier_checkpoints:
            raise ConfigError("at least one stage-1 and one stage-2 checkpoint are needed")
        self.seg_checkpoints = [Path(p) for p in seg_checkpoints]
        self.classifier_checkpoints = [Path(p) for p in classifier_checkpoints]
        self.prior = prior_predictions(None) if prior is None else np.asarray(prior, dtype=np.float64)
        self.device = resolve_device(self.cfg.device)
        logger.info(
            "models: stage 1 %s; stage 2 %s; device %s",
            [str(p) for p in self.seg_checkpoints],
            [str(p) for p in self.classifier_checkpoints],
            self.device,
        )
        self._segmenters: dict[str, Any] = {}
        self._ensembles: dict[str, Any] = {}
        # The crop geometry must be the one the classifiers were trained on: it travels in their checkpoints.
        self.crop_config = self._ensemble("full").crop_config
        self.calibrations = self._ensemble("full").calibrations
        if self.cfg.rule == "calibrated" and not self.calibrations:
            logger.warning("rule 'calibrated': no stage-2 checkpoint carries a patient_overall calibration "
                           "(trained before they were stored); using plain noisy_or")
        self._segmenter("full")

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
            prior: ``(8,)`` fallback; default the real train.csv prevalence.
        """
        return cls(find_checkpoints(models_dir, "seg"), find_checkpoints(models_dir, "cls"), cfg, prior)

    def _segmenter(self, path: str) -> Any:
        """Stage 1 of a path: every checkpoint on the full path, the first one on the cheap path."""
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

    def _ensemble(self, path: str) -> Any:
        """Stage 2 of a path: every fold on the full path, the first ``cheap_folds`` on the cheap path."""
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
                cpu_bf16=full.cpu_bf16,
            )
        return self._ensembles[path]

    def fingerprint(self) -> dict[str, Any]:
        """What decides the predictions: model files, prior and settings (resume reuses parts only if equal)."""
        settings = dataclasses.asdict(self.cfg)
        for volatile in ("device", "time_budget_s", "budget_safety", "resume"):
            settings.pop(volatile)
        return {
            "version": _PARTS_VERSION,
            "seg": [_file_fingerprint(p) for p in self.seg_checkpoints],
            "cls": [_file_fingerprint(p) for p in self.classifier_checkpoints],
            "prior": [round(float(v), 12) for v in self.prior],
            "settings": settings,
        }

    def aggregate(self, vertebra_probs: np.ndarray) -> np.ndarray:
        """Seven classifier outputs (NaN = not found) → eight clipped probabilities.

        Args:
            vertebra_probs: ``(7,)``; a non-finite entry takes that vertebra's prior.
        """
        filled = np.where(np.isfinite(vertebra_probs), vertebra_probs, self.prior[: len(VERTEBRAE)])
        filled = clip_probabilities(filled)
        rule = "noisy_or" if self.cfg.rule == "calibrated" and not self.calibrations else self.cfg.rule
        overall = patient_overall(filled[None], rule=rule, blend_weight=self.cfg.blend_weight,
                                  calibrations=self.calibrations)[0]
        return clip_probabilities(np.append(filled, overall))

    def predict_study(self, folder: str | Path, path: str = "full") -> StudyPrediction:
        """Predict one study folder of DICOM files.

        Args:
            folder: the study's folder (``test_images/<UID>``).
            path: ``full`` (every fold, TTA if configured) or ``cheap`` (``cheap_folds`` folds, no TTA).

        Raises:
            StudyFailure: a stage failed; ``stage`` names it and the message the cause.
        """
        from rsna_cspine.crops.extract import extract_vertebra_crops
        from rsna_cspine.io.dicom import load_series

        if path not in ("full", "cheap"):
            raise ValueError(f"path must be 'full' or 'cheap', got {path!r}")
        folder = Path(folder)
        timings: dict[str, float] = {}
        stage = "load"
        start = time.perf_counter()
        try:
            volume = load_series(folder)
            timings["load"] = time.perf_counter() - start
            notes = list(volume.warnings)
            n_slices = volume.shape[0]

            stage, tick = "segment", time.perf_counter()
            segmentation = self._segmenter(path).predict(volume)
            timings["segment"] = time.perf_counter() - tick

            stage, tick = "crop", time.perf_counter()
            crops = extract_vertebra_crops(volume.hu, segmentation.mask, self.crop_config, spacing=volume.spacing)
            # The volume and mask are the big arrays; drop them before the classifier allocates its own.
            del volume, segmentation
            timings["crop"] = time.perf_counter() - tick

            stage, tick = "classify", time.perf_counter()
            tta = self.cfg.tta and path == "full"
            raw = np.asarray(self._ensemble(path).predict(crops, tta=tta), dtype=np.float64)
            timings["classify"] = time.perf_counter() - tick
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure of any stage is this study's failure;
            # BaseException because Rust decoders (pylibjpeg-rle) raise pyo3's PanicException, not an Exception.
            raise StudyFailure(f"{stage} failed: {exc.__class__.__name__}: {exc}", folder, stage) from exc
        if raw.shape != (len(VERTEBRAE),):
            raise StudyFailure(f"classify failed: ensemble returned shape {raw.shape}, expected (7,)", folder, "classify")
        present = np.asarray(crops.present, dtype=bool)
        broken = present & ~np.isfinite(raw)
        if broken.any():
            notes.append(f"non-finite classifier output for {[VERTEBRAE[i] for i in np.flatnonzero(broken)]}: prior used")
        raw = np.where(present, raw, np.nan)
        absent = [VERTEBRAE[i] for i in np.flatnonzero(~present)]
        if absent:
            notes.append(f"vertebrae not found: {absent}: prior used")
        timings["total"] = time.perf_counter() - start
        return StudyPrediction(
            uid=folder.name,
            probs=self.aggregate(raw),
            vertebra_probs=raw,
            path=path,
            timings=timings,
            n_slices=n_slices,
            warnings=notes,
        )


# ----------------------------------------------------------------------------------------------
# Time budget
# ----------------------------------------------------------------------------------------------


@dataclass
class TimeBudget:
    """Chooses each study's path so that the run ends before ``limit_s``.

    Before each study the time left is compared with ``safety ×`` the median time of a study on each
    path times the number of studies left: the full path while it fits for all of them, else the cheap
    path (tried once to measure it; kept while one more study fits), else the prior.

    Attributes:
        limit_s: the wall-clock limit in seconds from ``start``; ``None`` = no limit.
        safety: factor on the estimates.
        start: ``time.monotonic()`` when the run began.
    """

    limit_s: float | None
    safety: float = 1.2
    start: float = field(default_factory=time.monotonic)
    times: dict[str, list[float]] = field(default_factory=lambda: {"full": [], "cheap": []})

    def remaining(self) -> float:
        if self.limit_s is None:
            return float("inf")
        return self.limit_s - (time.monotonic() - self.start)

    def record(self, path: str, seconds: float) -> None:
        """Add one finished study's time on ``path`` to the estimates."""
        if path in self.times:
            self.times[path].append(seconds)

    def estimate(self, path: str) -> float | None:
        """Median seconds per study on ``path`` (``None`` before the first one)."""
        return statistics.median(self.times[path]) if self.times[path] else None

    def choose(self, n_left: int) -> str:
        """Path for the next study.

        Args:
            n_left: studies still to predict, this one included.
        """
        if self.limit_s is None:
            return "full"
        remaining = self.remaining()
        if remaining <= 0:
            return "prior"
        full, cheap = self.estimate("full"), self.estimate("cheap")
        if full is None:
            # Nothing measured yet: the only way to learn the cost is to run one study.
            return "full"
        if full * self.safety * n_left <= remaining:
            return "full"
        # The cheap path is never slower than the full one, so the full estimate bounds it until measured.
        cheap_bound = full if cheap is None else cheap
        if cheap_bound * self.safety <= remaining:
            return "cheap"
        return "prior"


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 ≤ i < n``.

    Args:
        text: e.g. ``"2/4"`` (the third of four shards).
    """
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise ConfigError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard i/n needs n ≥ 1 and 0 ≤ i < n, got {text!r}")
    return index, count


def shard_studies(uids: list[str], shard: tuple[int, int]) -> list[str]:
    """The studies of one shard: those at positions ``k`` with ``k % n == i`` in test.csv order.

    Args:
        uids: every study, in test.csv order.
        shard: ``(i, n)``.
    """
    index, count = shard
    return [uid for k, uid in enumerate(uids) if k % count == index]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_shard(rows: pd.DataFrame, path: str | Path, shard: tuple[int, int], studies: list[str], test_csv: Path) -> Path:
    """Write one shard's rows behind a one-line JSON header (``# {...}``) that ``merge`` checks.

    Args:
        rows: ``row_id, fractured`` of the shard's studies.
        path: the shard file.
        shard: ``(i, n)``.
        studies: the shard's StudyInstanceUIDs, in test.csv order.
        test_csv: the test.csv the shard was cut from (its checksum goes into the header).
    """
    header = {
        "format": SHARD_FORMAT,
        "shard": shard[0],
        "n_shards": shard[1],
        "test_csv_sha256": _sha256(Path(test_csv)),
        "studies": studies,
    }
    path = Path(path)
    _atomic_write_text(path, "# " + json.dumps(header) + "\n" + rows.to_csv(index=False))
    logger.info("wrote shard %d/%d (%d studies, %d rows) to %s", shard[0], shard[1], len(studies), len(rows), path)
    return path


def read_shard(path: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Read a shard file written by :func:`write_shard`.

    Args:
        path: the shard file.

    Returns:
        ``(header, rows)``.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError("shard file not found", path)
    with path.open() as fh:
        first = fh.readline()
    try:
        header = json.loads(first[1:]) if first.startswith("#") else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise SubmissionError(f"not a shard file (its first line must be '# {{\"format\": \"{SHARD_FORMAT}\", ...}}')", path)
    try:
        rows = pd.read_csv(path, skiprows=1, dtype={"row_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise SubmissionError(f"unreadable shard rows ({exc})", path) from exc
    if list(rows.columns) != ["row_id", "fractured"]:
        raise SubmissionError(f"shard columns must be row_id, fractured; got {list(rows.columns)}", path)
    return header, rows


def merge_shards(shard_files: list[str | Path], test_csv: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """Join shard files into one submission in test.csv order.

    Refuses (``SubmissionError``) shards of different ``n`` or of another test.csv, a shard index
    missing or given twice, a study in two shards or in none, and rows that do not match the shard's
    studies exactly.

    Args:
        shard_files: every shard file of one run (``predict --shard i/n``), any order.
        test_csv: the test.csv the shards were cut from.
        out_csv: the merged submission (written atomically and validated).

    Returns:
        The merged submission (``row_id, fractured``) in test.csv order.
    """
    test_csv = Path(test_csv)
    test = read_test_csv(test_csv)
    test_sha = _sha256(test_csv)
    if not shard_files:
        raise SubmissionError("no shard files given")
    shards: dict[int, tuple[Path, dict[str, Any], pd.DataFrame]] = {}
    counts: set[int] = set()
    for file in map(Path, shard_files):
        header, rows = read_shard(file)
        index, count = int(header["shard"]), int(header["n_shards"])
        counts.add(count)
        if header.get("test_csv_sha256") != test_sha:
            raise SubmissionError(f"shard was cut from another test.csv than {test_csv}", file)
        if index in shards:
            raise SubmissionError(f"shard {index}/{count} given twice (also {shards[index][0]})", file)
        shards[index] = (file, header, rows)
    if len(counts) != 1:
        raise SubmissionError(f"shards disagree on the number of shards: {sorted(counts)}")
    (count,) = counts
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        raise SubmissionError(f"missing shard(s) {missing} of {count}; got {sorted(shards)}")
    uids = test_studies(test)
    owner: dict[str, int] = {}
    for index, (file, header, rows) in sorted(shards.items()):
        for uid in header["studies"]:
            if uid in owner:
                raise SubmissionError(f"study {uid} is in shard {owner[uid]} and shard {index}", file)
            owner[uid] = index
        expected = set(test.loc[test["StudyInstanceUID"].isin(header["studies"]), "row_id"])
        got = set(rows["row_id"].astype(str))
        if got != expected or len(rows) != len(got):
            raise SubmissionError(
                f"rows do not match the shard's {len(header['studies'])} studies: "
                f"{len(expected - got)} missing, {len(got - expected)} extra, {len(rows) - len(got)} duplicated",
                file,
            )
    absent = [uid for uid in uids if uid not in owner]
    if absent:
        raise SubmissionError(f"{len(absent)} test.csv studies are in no shard, e.g. {absent[:5]}")
    unknown = sorted(set(owner) - set(uids))
    if unknown:
        raise SubmissionError(f"{len(unknown)} shard studies are not in {test_csv}, e.g. {unknown[:5]}")
    merged = pd.concat([rows for _, _, rows in shards.values()], ignore_index=True)
    write_submission(merged, out_csv, test)
    logger.info("merged %d shards (%d studies) into %s", count, len(uids), out_csv)
    return pd.read_csv(out_csv, dtype={"row_id": str})


# ----------------------------------------------------------------------------------------------
# A whole dataset
# ----------------------------------------------------------------------------------------------


def timing_log_path(out_csv: str | Path) -> Path:
    """``submission.csv`` → ``submission.timings.csv`` (the per-study timing log beside the output)."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.timings.csv")


def parts_dir(out_csv: str | Path) -> Path:
    """``submission.csv`` → ``submission.csv.parts/`` (one JSON per finished study, for resuming)."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name + ".parts")


class _Parts:
    """Per-study results on disk so that an interrupted run resumes where it stopped."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        stamp = folder / "fingerprint.json"
        if folder.is_dir():
            same = stamp.is_file() and json.loads(stamp.read_text()) == fingerprint
            if not resume or not same:
                if resume:
                    logger.warning("%s holds results of other models or settings: starting afresh", folder)
                for old in folder.glob("*.json"):
                    old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(stamp, json.dumps(fingerprint, indent=1))

    def load(self, uid: str) -> dict[str, Any] | None:
        file = self.folder / f"{uid}.json"
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("status") == "ok" else None

    def save(self, record: dict[str, Any]) -> None:
        _atomic_write_text(self.folder / f"{record['StudyInstanceUID']}.json", json.dumps(record))


def _release_memory(device: Any) -> None:
    """Free what a failed study left behind (its arrays may have sat in the traceback until now)."""
    gc.collect()
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()


def _dataset_prior(layout: KaggleLayout, cfg: PipelineConfig) -> np.ndarray:
    if cfg.prior == "train_csv" and layout.train_csv.is_file():
        prior = prior_predictions(read_train_labels(layout.train_csv))
        logger.info("prior from %s: %s", layout.train_csv, np.round(prior, 4).tolist())
        return prior
    return prior_predictions(None)


def _record(uid: str, path: str, status: str, reason: str = "", prediction: StudyPrediction | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"StudyInstanceUID": uid, "path": path, "status": status, "resumed": False, "reason": reason}
    timings = prediction.timings if prediction is not None else {}
    for stage in STAGES:
        record[f"{stage}_s"] = round(timings[stage], 4) if stage in timings else None
    record["total_s"] = round(timings["total"], 4) if "total" in timings else None
    record["n_slices"] = prediction.n_slices if prediction is not None else None
    record["vertebrae_found"] = prediction.vertebrae_found if prediction is not None else None
    if prediction is not None:
        record["probs"] = [float(v) for v in prediction.probs]
    return record


def _predict_studies(
    pipeline: FracturePipeline,
    layout: KaggleLayout,
    uids: list[str],
    parts: _Parts,
    budget: TimeBudget,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The per-study loop of :func:`predict_dataset`: resume, choose a path, predict, never raise for a study."""
    records: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    counts = {"full": 0, "cheap": 0, "prior": 0, "failed": 0, "resumed": 0}
    bar = tqdm(uids, desc="predict", unit="study", disable=not progress or None, dynamic_ncols=True)
    for k, uid in enumerate(bar):
        done = parts.load(uid)
        if done is not None:
            records.append({**done, "resumed": True})
            predictions[uid] = np.asarray(done["probs"], dtype=np.float64)
            counts["resumed"] += 1
            continue
        path = budget.choose(len(uids) - k)
        if path == "prior":
            records.append(_record(uid, "prior", "budget", "time budget: not enough time left"))
            counts["prior"] += 1
            continue
        try:
            prediction = pipeline.predict_study(layout.study_dir(uid, pipeline.cfg.split), path=path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever goes wrong (native panics too), this study gets the prior
            reason = exc.reason if isinstance(exc, StudyFailure) else f"{exc.__class__.__name__}: {exc}"
            logger.warning("study %s failed, prior used: %s", uid, reason)
            records.append(_record(uid, path, "failed", reason))
            counts["failed"] += 1
            del exc
            _release_memory(pipeline.device)
        else:
            for note in prediction.warnings:
                logger.info("study %s: %s", uid, note)
            predictions[uid] = prediction.probs
            record = _record(uid, path, "ok", "; ".join(prediction.warnings), prediction)
            records.append(record)
            parts.save(record)
            budget.record(path, prediction.timings["total"])
            counts[path] += 1
        bar.set_postfix({key: value for key, value in counts.items() if value}, refresh=False)
    bar.close()
    logger.info(
        "%d studies: %d full path, %d cheap path, %d prior (time budget), %d failed (prior), %d resumed",
        len(uids), counts["full"], counts["cheap"], counts["prior"], counts["failed"], counts["resumed"],
    )  # fmt: skip
    return records, predictions


def predict_dataset(
    data_dir: str | Path,
    models_dir: str | Path,
    out_csv: str | Path,
    shard: tuple[int, int] | None = None,
    cfg: PipelineConfig | None = None,
    progress: bool = True,
    pipeline: FracturePipeline | None = None,
) -> pd.DataFrame:
    """Predict every study of ``<data>/test.csv`` and write the submission (or one shard of it).

    Studies come from test.csv, in its order. A study that fails at any stage gets the prior, a
    warning naming it and the cause, and the run goes on; the file written is always complete, finite
    and valid. Beside it: ``<stem>.timings.csv`` (one row per study: path, status, seconds per stage,
    fallback reason) and ``<out>.parts/`` (finished studies, so that a rerun skips them).

    Args:
        data_dir: Kaggle-layout folder (``test.csv``, ``test_images/<UID>/*.dcm``, optional ``train.csv``).
        models_dir: folder with ``seg/`` and ``cls/`` checkpoints (see the module docstring).
        out_csv: the submission, or with ``shard`` the shard file that ``merge_shards`` joins.
        shard: ``(i, n)`` to predict only studies ``k`` of test.csv with ``k % n == i``.
        cfg: pipeline settings (defaults when ``None``).
        progress: show a tqdm bar.
        pipeline: an already loaded pipeline (notebooks, tests; its prior and split are used); else built
            from ``models_dir`` with ``cfg``.

    Returns:
        The rows written: ``row_id, fractured`` in test.csv order (only the shard's studies with ``shard``).
    """
    cfg = cfg or PipelineConfig()
    cfg.validate()
    # The budget covers the whole call, model loading included: that is what the Kaggle limit counts.
    budget_clock = TimeBudget(cfg.time_budget_s, cfg.budget_safety)
    layout = KaggleLayout(Path(data_dir))
    out_csv = Path(out_csv)
    test = read_test_csv(layout.test_csv)
    all_uids = test_studies(test)
    uids = all_uids if shard is None else shard_studies(all_uids, shard)
    prior = _dataset_prior(layout, cfg)
    shard_note = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    logger.info("%d studies to predict%s from %s", len(uids), shard_note, layout.test_csv)

    records: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    if pipeline is not None:
        prior = pipeline.prior  # one prior for absent vertebrae and failed studies alike
    elif uids and (cfg.time_budget_s is None or cfg.time_budget_s > 0):
        try:
            pipeline = FracturePipeline.from_models_dir(models_dir, cfg, prior)
        except Exception as exc:  # noqa: BLE001 - without models the submission is still written, all prior
            logger.error("could not load the models from %s (%s): every study gets the prior", models_dir, exc)
            records = [_record(uid, "prior", "failed", f"models: {exc}") for uid in uids]
    if pipeline is not None:
        fingerprint = {**pipeline.fingerprint(), "data": str(layout.root.resolve()), "split": cfg.split}
        parts = _Parts(parts_dir(out_csv), fingerprint, cfg.resume)
        records, predictions = _predict_studies(pipeline, layout, uids, parts, budget_clock, progress)
    elif not records:
        records = [_record(uid, "prior", "budget", "time budget is 0") for uid in uids]

    timings = pd.DataFrame(records).reindex(columns=list(TIMING_COLUMNS))
    timings = timings.astype({"n_slices": "Int64", "vertebrae_found": "Int64", "resumed": bool})
    _atomic_write_text(timing_log_path(out_csv), timings.to_csv(index=False))

    selected = check_test_frame(test[test["StudyInstanceUID"].isin(set(uids))], source=layout.test_csv)
    if uids:
        submission, fallback = build_submission(selected, predictions, fallback=prior)
    else:  # a shard beyond the number of studies: an empty (but well-formed) shard file
        submission, fallback = pd.DataFrame({"row_id": pd.Series(dtype=str), "fractured": pd.Series(dtype=float)}), []
    if shard is None:
        write_submission(submission, out_csv, test)
    else:
        write_shard(submission, out_csv, shard, uids, layout.test_csv)
    logger.info(
        "wrote %s (%d rows, %d studies, %d with the prior); timings in %s",
        out_csv,
        len(submission),
        len(uids),
        len(fallback),
        timing_log_path(out_csv),
    )
    return submission

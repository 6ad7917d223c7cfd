"""Typed settings of ``rsna-cspine prepare`` (defaults ← YAML ← ``key=value`` ← typed values) and what
of them decides a prepared study (the cache's fingerprint).

The stage-1 input settings must equal the stage-1 training config's ``data.grid``, ``data.hu_window``,
``data.antialias`` and the cascade's ``data.spacing``, ``data.box_margin_mm`` and ``localiser.spacing``, the
crop settings stage 2's ``data.crop``: the trainers refuse a cache prepared otherwise.
:func:`prepare_config_for` copies them from the training configs, so the two cannot drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsna_cspine.config import to_dict
from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.errors import ConfigError, LayoutError
from rsna_cspine.runner import split_cpus, usable_cpus

if TYPE_CHECKING:
    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.seg.boxes import CascadeGeometry
    from rsna_cspine.seg.config import SegConfig

#: Bumped when what a prepared study holds changes meaning, so older caches are refused.
PREPARE_VERSION = 1
#: Which mask the crops are cut from: ``auto`` = the stage-1 models' where models are given, else the
#: true one; ``gt`` true only; ``pred`` the models' only; ``gt_then_pred`` true where the study has one.
MASK_SOURCES: tuple[str, ...] = ("auto", "gt", "pred", "gt_then_pred")
#: Memory one study may need while it is prepared (a 512×512×700 volume in float32 is 0.73 GB; the
#: stage-1 grid, the full-resolution mask and the crops come on top): bounds the default worker count.
STUDY_MEMORY_GIB = 3.0


@dataclass
class Stage1InputConfig:
    """The volume every study gets on the stage-1 network grid (``seg.preprocess.write_stage1_input``).

    Attributes:
        grid: ``(D, H, W)``; must equal the stage-1 training config's ``data.grid``.
        hu_window: HU range mapped to [0, 1]; its ``data.hu_window``.
        antialias: its ``data.antialias``.
        spacing: its ``data.spacing``: mm per fine-grid voxel of the cascade (empty: the whole volume on
            the grid, no cascade).
        box_margin_mm: its ``data.box_margin_mm`` (the cascade only; empty without it).
        localiser_spacing: its ``localiser.spacing`` (the cascade only; empty without it).
        reference_neck_mm: its ``data.reference_neck_mm`` (the cascade only; 0: off).
    """

    grid: tuple[int, int, int] = (128, 128, 128)
    hu_window: tuple[float, float] = (-400.0, 1600.0)
    antialias: bool = True
    spacing: tuple[float, ...] = ()
    box_margin_mm: tuple[float, ...] = ()
    localiser_spacing: tuple[float, ...] = ()
    reference_neck_mm: float = 0.0

    def cascade(self) -> CascadeGeometry | None:
        """The cascade's spacings and margins (None: whole-volume grid)."""
        from rsna_cspine.seg.boxes import CascadeGeometry

        if not self.spacing:
            return None
        return CascadeGeometry(tuple(self.spacing), tuple(self.box_margin_mm),  # type: ignore[arg-type]
                               tuple(self.localiser_spacing), float(self.reference_neck_mm))


@dataclass
class PrepareConfig:
    """How ``rsna-cspine prepare`` turns each study into what training needs.

    Attributes:
        stage1: the stage-1 input (the volume on the grid, its label map where it has a segmentation).
        crop: the per-vertebra 2.5D stacks (stage 2's ``data.crop``).
        mask_source: which mask the crops are cut from (see :data:`MASK_SOURCES`).
        segmented_only: prepare only the studies with a segmentation (what stage 1 trains on).
        workers: studies prepared at once (0 = as many as the CPU budget and memory allow).
        cpus: CPU budget in all, decoder processes and torch threads of every study included
            (0 = the cores this process may use); never more threads are busy than this.
        device: where the stage-1 models run (``auto``, ``cpu``, ``cuda[:k]``).
    """

    stage1: Stage1InputConfig = field(default_factory=Stage1InputConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    mask_source: str = "auto"
    segmented_only: bool = False
    workers: int = 0
    cpus: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot prepare a study."""
        self.crop.validate()
        if self.mask_source not in MASK_SOURCES:
            raise ConfigError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if any(int(g) < 1 for g in self.stage1.grid) or self.stage1.hu_window[1] <= self.stage1.hu_window[0]:
            raise ConfigError(f"stage1.grid must be positive and stage1.hu_window (low, high) with high > low; got "
                              f"{self.stage1.grid}, {self.stage1.hu_window}")
        s1 = self.stage1
        cascade = (s1.spacing, s1.box_margin_mm, s1.localiser_spacing)
        if s1.spacing and (any(len(v) != 3 for v in cascade) or min(s1.spacing) <= 0 or min(s1.localiser_spacing) <= 0
                           or min(s1.box_margin_mm) < 0):
            raise ConfigError(f"stage1.spacing, box_margin_mm and localiser_spacing (the cascade) need 3 values "
                              f"each (spacings > 0, margin ≥ 0); got {[list(v) for v in cascade]}")
        if not s1.spacing and (s1.box_margin_mm or s1.localiser_spacing):
            raise ConfigError("stage1.box_margin_mm and localiser_spacing belong to the cascade: set stage1.spacing "
                              "too, or leave them empty")
        if self.workers < 0 or self.cpus < 0:
            raise ConfigError(f"workers and cpus must be ≥ 0 (0 = fit the machine), got {self.workers}, {self.cpus}")

    def cpu_plan(self) -> tuple[int, int]:
        """``(studies at once, threads per study)`` within the CPU budget (see :func:`runner.split_cpus`)."""
        budget = self.cpus or usable_cpus()
        workers = self.workers or max(1, min(budget, int(_memory_gib() // STUDY_MEMORY_GIB)))
        return split_cpus(budget, workers)


def _memory_gib() -> float:
    """Physical memory of the machine in GiB (a generous number where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 1024.0


def prepare_config_for(seg: SegConfig | None = None, cls: ClsConfig | None = None, **values: Any) -> PrepareConfig:
    """A :class:`PrepareConfig` whose stage-1 input and crops are those of the training configs given.

    Args:
        seg: stage-1 training config (its ``data.grid``, ``hu_window``, ``antialias``; the cascade's
            ``data.spacing``, ``data.box_margin_mm``, ``localiser.spacing``).
        cls: stage-2 training config (its ``data.crop``).
        values: other fields (``workers=2``, ``mask_source="gt"``, ...).
    """
    cfg = PrepareConfig(**values)
    if seg is not None:
        cfg.stage1 = Stage1InputConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in stage1_settings(seg).items()})
    if cls is not None:
        cfg.crop = CropConfig(**to_dict(cls.data.crop))
    return cfg


def stage1_settings(seg: SegConfig) -> dict[str, Any]:
    """The :class:`Stage1InputConfig` fields of a stage-1 training config (JSON-able; the cascade's only with it).

    Args:
        seg: stage-1 training config.
    """
    d = seg.data
    cascade = bool(d.spacing)
    return {"grid": [int(g) for g in d.grid], "hu_window": [float(h) for h in d.hu_window],
            "antialias": bool(d.antialias), "spacing": [float(v) for v in d.spacing],
            "box_margin_mm": [float(v) for v in d.box_margin_mm] if cascade else [],
            "localiser_spacing": [float(v) for v in seg.localiser.spacing] if cascade else [],
            # Only when on, so the settings (and fingerprints) of caches prepared without it stay the same.
            **({"reference_neck_mm": float(d.reference_neck_mm)} if cascade and d.reference_neck_mm > 0 else {})}


def training_config_overrides(seg_config: str | Path | None, cls_config: str | Path | None) -> list[str]:
    """The ``stage1`` and ``crop`` sections of training config files as ``key=value`` overrides (placed
    before the user's own, which then win over them).

    Args:
        seg_config: a stage-1 training YAML (e.g. ``configs/seg.yaml``), or None.
        cls_config: a stage-2 training YAML (e.g. ``configs/cls_resnet50.yaml``), or None.
    """
    import json

    from rsna_cspine.config import load_config

    overrides: list[str] = []
    if seg_config is not None:
        from rsna_cspine.seg.config import SegConfig

        stage1 = stage1_settings(load_config(SegConfig, seg_config))
        overrides.append(f"stage1={json.dumps(stage1)}")  # JSON is YAML: one override carries the section
    if cls_config is not None:
        from rsna_cspine.cls.config import ClsConfig

        overrides.append(f"crop={json.dumps(to_dict(load_config(ClsConfig, cls_config).data.crop))}")
    return overrides


def resolve_seg_models(path: str | Path | None) -> list[Path]:
    """Stage-1 checkpoints named by ``--seg-models``: a checkpoint file, a models folder (``seg/**/best.pt``,
    as ``predict`` reads it) or a folder of runs (``**/best.pt``); sorted. None → no models.

    Args:
        path: the file or folder.
    """
    if path is None:
        return []
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LayoutError("stage-1 models not found", path)
    if (path / "seg").is_dir():
        from rsna_cspine.engine.checkpoints import find_checkpoints

        return find_checkpoints(path, "seg")
    found = sorted(path.rglob("best.pt"))
    if not found:
        raise LayoutError("no stage-1 checkpoint (expected seg/**/best.pt or **/best.pt)", path)
    return found


def settings_fingerprint(cfg: PrepareConfig, seg_models: list[Path], split: str) -> dict[str, Any]:
    """What decides every prepared study of a cache: its ledger fingerprint, stored in ``finished/``.

    The models enter by content (SHA-256), not by path, so machines that keep them in other folders
    can fill one cache. Workers, CPU budget and device are left out (they change the speed, not the
    files), and so is ``segmented_only`` (it picks studies; a later run may add the others).

    Args:
        cfg: the settings.
        seg_models: the stage-1 checkpoints (empty: none).
        split: ``train`` or ``test``.
    """
    from rsna_cspine.crops.cache import SLICE_LABEL_RULE
    from rsna_cspine.io.files import sha256_file
    from rsna_cspine.seg.preprocess import CACHE_VERSION

    stage1 = to_dict(cfg.stage1)
    if not stage1.get("reference_neck_mm"):  # off: left out, so caches prepared before it existed still match
        stage1.pop("reference_neck_mm", None)
    return {
        "version": PREPARE_VERSION,
        "stage1_cache_version": CACHE_VERSION,
        "split": split,
        "stage1": stage1,
        "crop": to_dict(cfg.crop),
        "slice_label_rule": SLICE_LABEL_RULE,
        "mask_source": cfg.mask_source,
        "seg_models": [{"name": p.name, "sha256": sha256_file(p)} for p in seg_models],
    }

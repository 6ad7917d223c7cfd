"""Every knob of the synthetic phantom generator, with typed defaults and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from rsna_cspine.errors import ConfigError

#: Fields holding a ``(low, high)`` range that one value per study (or per fracture) is drawn from.
_FLOAT_RANGES = (
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "noise_hu",
    "fracture_size_mm",
    "fracture_contrast_hu",
    "height_loss",
    "anatomy_scale",
    "smoothing_voxels",
    "body_habitus",
    "benign_rate",
    "neck_top_mm",
    "head_top_mm",
    "thick_slice_mm",
    "wide_fov_scale",
)
_INT_RANGES = ("n_slices", "thoracic_vertebrae", "slab_slices")
_FRACTIONS = (
    "test_fraction",
    "compressed_fraction",
    "reversed_fraction",
    "shuffled_fraction",
    "bbox_fraction",
    "segmentation_fraction",
    "circular_fov_fraction",
    "contrast_fraction",
    "signed_fraction",
    "mixed_rescale_fraction",
    "implicit_vr_fraction",
    "displaced_fraction",
    "compression_fraction",
    "second_defect_fraction",
    "line_fraction",
    "fov_head_fraction",
    "fov_slab_fraction",
    "thick_slice_fraction",
    "wide_fov_fraction",
    "dental_metal_fraction",
    "arms_fraction",
)

#: Fractures more conspicuous than the generator's defaults (5-10 mm and a 500-900 HU drop against 3-8 mm
#: and 300-700 HU; more displaced fragments and compressed bodies, fewer benign look-alikes): those of the
#: stage-2 evidence runs, the demo (``configs/demo.yaml``'s ``synth:`` block, kept equal by a test) and
#: ``synth-sagittal``. At the defaults a ten-minute CPU stage 2 learns little beyond each vertebra's base rate
#: (benchmarks/results/evidence.md, "The demo").
CONSPICUOUS_FRACTURES: dict[str, Any] = {
    "fracture_size_mm": (5.0, 10.0),
    "fracture_contrast_hu": (500.0, 900.0),
    "displaced_fraction": 0.6,
    "compression_fraction": 0.6,
    "height_loss": (0.15, 0.4),
    "benign_rate": (0.0, 0.15),
}


@dataclass
class SynthConfig:
    """Settings of the phantom generator; the first block is the public contract other stages use.

    Every ``tuple[float, float]`` is a ``(low, high)`` range: each study (or each fracture) draws its
    own value uniformly from it, so one config yields a varied dataset.

    Attributes:
        n_studies: number of studies written by ``write_dataset``.
        seed: master seed; study ``k`` depends only on ``(config, seed, k)``.
        image_size: in-plane matrix (rows = columns).
        pixel_spacing_mm: in-plane spacing range at 256 px; see ``scale_spacing_with_size``.
        slice_thickness_mm: slice spacing range; the slice count follows from anatomy and coverage.
        n_slices: force a slice-count range instead (the slice spacing adapts to the coverage).
        noise_hu: Gaussian noise standard deviation range (HU).
        fracture_size_mm: diameter range of one fracture defect.
        fracture_contrast_hu: HU drop inside a defect (floored at soft-tissue values).
        height_loss: fraction of the body height lost by a compression fracture.
        prevalence_scale: multiplies the real per-vertebra fracture prevalences.
        thoracic_vertebrae: how many thoracic vertebrae (T1..) the scan covers, inclusive range.
        anatomy_scale: global size factor range of the patient's skeleton.
        test_fraction: share of studies written to ``test_images`` (exact count, rounded).
        compressed_fraction: share of series stored compressed (RLE / JPEG 2000 / JPEG Lossless).
        reversed_fraction: share stored with file numbers running inferior→superior.
        shuffled_fraction: share whose file numbers are a random permutation.
        bbox_fraction: share of fractured train studies that get ``train_bounding_boxes`` rows.
        segmentation_fraction: share of train studies with ``segmentations/<UID>.nii``.
        scale_spacing_with_size: when True, ``pixel_spacing_mm`` is the range at 256 px and the spacing
            used is ``value × 256 / image_size``, so the field of view (and the anatomy's place in it)
            is the same at every matrix size.
        circular_fov_fraction: share of studies whose pixels outside the reconstruction circle are −2048.
        contrast_fraction: share of studies with iodinated contrast in the vessels (150–350 HU).
        body_habitus: size factor range of the soft-tissue outline (thin … large neck).
        benign_rate: per-study range of the probability that a vertebra shows each benign variation
            (osteophyte, endplate sclerosis, bone island, basivertebral channel, disc vacuum).
        smoothing_voxels: in-plane Gaussian sigma range (voxels) standing in for partial volume.
        signed_fraction: share of series stored with PixelRepresentation 1.
        mixed_rescale_fraction: share of series whose RescaleIntercept changes from slice to slice.
        implicit_vr_fraction: share of uncompressed series written as Implicit VR Little Endian.
        displaced_fraction: share of fractured vertebrae with a displaced fragment.
        compression_fraction: share of fractured vertebrae with a body (C2–C7) that lose height.
        second_defect_fraction: share of fractured vertebrae with a second, independent defect.
        line_fraction: share of defects that are a lucent line through the whole structure rather
            than a cortical break at the surface.
    """

    n_studies: int = 20
    seed: int = 0
    image_size: int = 256
    pixel_spacing_mm: tuple[float, float] = (0.5, 0.9)
    slice_thickness_mm: tuple[float, float] = (1.0, 2.0)
    n_slices: tuple[int, int] | None = None
    noise_hu: tuple[float, float] = (10.0, 40.0)
    fracture_size_mm: tuple[float, float] = (3.0, 8.0)
    fracture_contrast_hu: tuple[float, float] = (300.0, 700.0)
    height_loss: tuple[float, float] = (0.0, 0.35)
    prevalence_scale: float = 1.0
    thoracic_vertebrae: tuple[int, int] = (1, 3)
    anatomy_scale: tuple[float, float] = (0.85, 1.15)
    test_fraction: float = 0.2
    compressed_fraction: float = 0.3
    reversed_fraction: float = 0.3
    shuffled_fraction: float = 0.2
    bbox_fraction: float = 0.5
    segmentation_fraction: float = 1.0
    # Knobs beyond the shared contract (realism and storage variety).
    scale_spacing_with_size: bool = True
    circular_fov_fraction: float = 0.5
    contrast_fraction: float = 0.2
    body_habitus: tuple[float, float] = (0.85, 1.25)
    benign_rate: tuple[float, float] = (0.05, 0.35)
    smoothing_voxels: tuple[float, float] = (0.4, 0.8)
    signed_fraction: float = 0.5
    mixed_rescale_fraction: float = 0.1
    implicit_vr_fraction: float = 0.2
    displaced_fraction: float = 0.35
    compression_fraction: float = 0.4
    second_defect_fraction: float = 0.3
    line_fraction: float = 0.4
    # Field of view and the anatomy around the neck.
    fov_head_fraction: float = 0.15
    fov_slab_fraction: float = 0.05
    neck_top_mm: tuple[float, float] = (10.0, 60.0)
    head_top_mm: tuple[float, float] = (-4.0, 25.0)
    slab_slices: tuple[int, int] = (5, 16)
    thick_slice_fraction: float = 0.1
    thick_slice_mm: tuple[float, float] = (2.0, 5.0)
    wide_fov_fraction: float = 0.15
    wide_fov_scale: tuple[float, float] = (1.3, 1.8)
    head_anatomy: bool = True
    shoulder_anatomy: bool = True
    dental_metal_fraction: float = 0.3
    arms_fraction: float = 0.6

    def __post_init__(self) -> None:
        # YAML and argparse hand over lists; the contract is tuples of the declared element type.
        for name in _FLOAT_RANGES:
            setattr(self, name, _as_range(name, getattr(self, name), float))
        for name in _INT_RANGES:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_range(name, value, int))
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first knob whose value is out of range."""
        if self.n_studies < 0:
            raise ConfigError(f"n_studies must be >= 0, got {self.n_studies}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        for name in _FRACTIONS:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if self.reversed_fraction + self.shuffled_fraction > 1.0 + 1e-9:
            raise ConfigError("reversed_fraction + shuffled_fraction must not exceed 1")
        if self.prevalence_scale < 0:
            raise ConfigError(f"prevalence_scale must be >= 0, got {self.prevalence_scale}")
        positive = ("pixel_spacing_mm", "slice_thickness_mm", "fracture_size_mm", "anatomy_scale",
                    "body_habitus")
        for name in positive:
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("noise_hu", "fracture_contrast_hu", "smoothing_voxels"):
            if getattr(self, name)[0] < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("height_loss", "benign_rate"):
            low, high = getattr(self, name)
            if low < 0 or high > (0.7 if name == "height_loss" else 1.0):
                raise ConfigError(f"{name} out of range: {getattr(self, name)}")
        if self.fov_head_fraction + self.fov_slab_fraction > 1.0 + 1e-9:
            raise ConfigError("fov_head_fraction + fov_slab_fraction must not exceed 1")
        if self.neck_top_mm[0] < 0:
            raise ConfigError(f"neck_top_mm must be >= 0, got {self.neck_top_mm}")
        if self.slab_slices[0] < 3:
            raise ConfigError(f"slab_slices must be >= 3, got {self.slab_slices}")
        if self.thick_slice_mm[0] <= 0:
            raise ConfigError(f"thick_slice_mm must be positive, got {self.thick_slice_mm}")
        if self.wide_fov_scale[0] < 1.0:
            raise ConfigError(f"wide_fov_scale must be >= 1, got {self.wide_fov_scale}")
        if self.n_slices is not None and self.n_slices[0] < 8:
            raise ConfigError(f"n_slices must be >= 8, got {self.n_slices}")
        if not 0 <= self.thoracic_vertebrae[0] <= self.thoracic_vertebrae[1] <= 4:
            raise ConfigError(f"thoracic_vertebrae must satisfy 0 <= low <= high <= 4, got "
                              f"{self.thoracic_vertebrae}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-python view (lists instead of tuples) for YAML/JSON dumps."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _as_range(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)  # a scalar pins the range to one value
    try:
        low, high = (kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a (low, high) pair of {kind.__name__}, got {value!r}") from exc
    if low > high:
        raise ConfigError(f"{name} range has low > high: {value!r}")
    return (low, high)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> SynthConfig:
    """Build a ``SynthConfig`` with the project's one loader (``rsna_cspine.config.load_config``).

    Defaults ← YAML file ← ``key=value`` overrides ← keyword values (``None`` values are ignored).

    Args:
        path: YAML mapping of knob names to values; a top-level ``synth:`` section is read instead when present.
        overrides: ``["noise_hu=[10, 40]", "n_studies=5"]``.
        **values: knob values set by a program (win over the file and the overrides).

    Returns:
        The validated config.
    """
    from rsna_cspine.config import load_config as load_project_config

    typed = {k: v for k, v in values.items() if v is not None}
    return load_project_config(SynthConfig, path, overrides, values=typed, section="synth")

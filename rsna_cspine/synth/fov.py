"""Which part of the patient a study covers: the scan's field of view, slice spacing and pixel size.

The anatomy is laid out once per patient, from the vertex of the skull down to T4 (``skeleton``);
the scan is a window on it, drawn from its own random stream, so one patient can be scanned with
any window. Three kinds of window:

- ``head``: vertex (or a little below it, ``head_top_mm``) to the upper chest, like a head-and-neck
  CT or a trauma survey (``SynthConfig.fov_head_fraction``);
- ``neck``: from just above the occipital condyles (up to the sella or orbits, ``neck_top_mm``) to
  T1–T4 (``thoracic_vertebrae``), like most RSNA 2022 studies: they begin at or above the skull base
  and end in the upper thoracic spine (DESIGN.md; the five real series of ``rsna_partial`` begin in the
  posterior fossa or end in the upper thorax);
- ``slab``: a few slices only (``slab_slices``) anywhere from the vertex to T4, like the partial series
  of ``rsna_partial`` (5–11 slices of skull base or upper thorax); a vertebra may be partly or not
  at all in view.

Slice spacing is ``slice_thickness_mm`` for most studies and ``thick_slice_mm`` for a share of
them (``thick_slice_fraction``: older and PET/CT neck scans, 2–5 mm); ``n_slices`` forces the slice
count of head and neck windows instead. A share of studies (``wide_fov_fraction``) is reconstructed
with a wider in-plane field of view (``wide_fov_scale`` × the pixel spacing), which shows the
shoulders, humeral heads and arms that a tight cervical-spine reconstruction cuts off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna_cspine.synth.config import SynthConfig

FOV_KINDS: tuple[str, ...] = ("head", "neck", "slab")


@dataclass(frozen=True)
class ScanWindow:
    """The scan in patient coordinates (depth in mm below the vertex of the skin).

    Attributes:
        kind: one of ``FOV_KINDS``.
        top: patient depth of the upper edge of the first slice.
        nz: number of slices.
        dz: slice spacing (mm), rounded so DICOM text stores it exactly.
        ps: in-plane pixel spacing (mm).
        wide: reconstructed with the wide in-plane field of view.
    """

    kind: str
    top: float
    nz: int
    dz: float
    ps: float
    wide: bool

    @property
    def bottom(self) -> float:
        return self.top + self.nz * self.dz

    @property
    def length(self) -> float:
        return self.nz * self.dz


def draw_fov_kind(cfg: SynthConfig, rng: np.random.Generator) -> str:
    """The window kind of a study: ``head`` / ``slab`` with their shares, ``neck`` otherwise."""
    draw = rng.random()
    if draw < cfg.fov_head_fraction:
        return "head"
    if draw < cfg.fov_head_fraction + cfg.fov_slab_fraction:
        return "slab"
    return "neck"


def plan_window(cfg: SynthConfig, rng: np.random.Generator, kind: str, skull_base: float,
                chest_end: float, anatomy_end: float) -> ScanWindow:
    """Draw the scan window of one study on its patient.

    Every draw happens whatever the kind (a fixed number per study), so two knob settings that pick
    different kinds still give the same spacing and in-plane draws.

    Args:
        cfg: generator settings.
        rng: the study's field-of-view stream.
        kind: one of ``FOV_KINDS``.
        skull_base: patient depth of the top of C1 (the occipital condyles sit just above it).
        chest_end: patient depth where head and neck windows end (inside the last covered vertebra
            or its disc below, see ``thoracic_vertebrae``).
        anatomy_end: deepest patient depth the anatomy is modelled to (slabs end above it).

    Returns:
        The window.
    """
    if kind not in FOV_KINDS:
        raise ValueError(f"unknown field-of-view kind {kind!r}; expected one of {FOV_KINDS}")
    u = rng.uniform
    thick = rng.random() < cfg.thick_slice_fraction
    dz = u(*cfg.thick_slice_mm) if thick else u(*cfg.slice_thickness_mm)
    head_top = u(*cfg.head_top_mm)
    neck_top = skull_base - u(*cfg.neck_top_mm)
    n_forced = int(rng.integers(cfg.n_slices[0], cfg.n_slices[1] + 1)) if cfg.n_slices is not None else 0
    n_slab = int(rng.integers(cfg.slab_slices[0], cfg.slab_slices[1] + 1))
    slab_position = rng.random()
    wide = rng.random() < cfg.wide_fov_fraction
    wide_scale = u(*cfg.wide_fov_scale)
    spacing_factor = 256.0 / cfg.image_size if cfg.scale_spacing_with_size else 1.0
    ps = u(*cfg.pixel_spacing_mm) * spacing_factor * (wide_scale if wide else 1.0)

    if kind == "slab":
        dz = round(dz, 3)
        length = n_slab * dz
        top = slab_position * max(anatomy_end - length, 0.0)
        nz = n_slab
    else:
        top = head_top if kind == "head" else neck_top
        length = chest_end - top
        if n_forced:
            nz = n_forced
            dz = round(length / nz, 3)
        else:
            dz = round(dz, 3)
            nz = max(8, int(round(length / dz)))
    return ScanWindow(kind=kind, top=float(top), nz=int(nz), dz=float(dz), ps=round(float(ps), 6), wide=wide)

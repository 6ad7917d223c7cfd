"""Synthetic lateral cervical-spine "radiographs" for the 2D mode: normal, fracture and dislocation.

Each image shows a neck soft-tissue shadow and a gently curved column of seven bright vertebral bodies
(superellipses with a cortical rim, and posterior elements behind them), all randomly placed, sized,
tilted and exposed. A **fracture** compresses one body into an anterior wedge and crosses it with a
lucent line; a **dislocation** shifts every body below one level anteriorly and widens that disc
space. The patient faces left (anterior = smaller x). Deterministic per seed: image ``i`` of class
``c`` draws from its own ``SeedSequence((seed, c, i))``, so adding images or classes never changes the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from rsna_cspine.errors import ConfigError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("normal", "fracture", "dislocation")
#: DICOM stored value = image (0..1) × this − 400, so the default window (-400, 1500) gives the image back.
_DICOM_SCALE = 1900.0
_DICOM_OFFSET = -400.0


@dataclass
class Synth2DConfig:
    """Knobs of the synthetic image folder.

    Attributes:
        per_class: images per class.
        seed: random seed.
        classes: a subset of :data:`KINDS`; one sub-folder each.
        size: image side (pixels).
        noise: SD of the additive Gaussian noise (image range 0..1).
        contrast: brightness of bone above the soft tissue.
        severity: scales the wedge, the lucent line and the shift (1 = clearly visible at 64 px).
        dicom_per_class: of each class, this many images are written as DICOM (in HU) instead of PNG.
    """

    per_class: int = 50
    seed: int = 0
    classes: tuple[str, ...] = ("normal", "fracture")
    size: int = 128
    noise: float = 0.06
    contrast: float = 0.55
    severity: float = 1.0
    dicom_per_class: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` on settings that cannot make a dataset."""
        unknown = [c for c in self.classes if c not in KINDS]
        if unknown or len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be two or three distinct names of {KINDS}, got {self.classes}")
        if self.per_class < 1 or self.size < 32 or self.noise < 0 or not 0 < self.contrast <= 1 or self.severity < 0:
            raise ConfigError("need per_class ≥ 1, size ≥ 32, noise ≥ 0, 0 < contrast ≤ 1, severity ≥ 0")
        if not 0 <= self.dicom_per_class <= self.per_class:
            raise ConfigError(f"dicom_per_class must be in [0, per_class], got {self.dicom_per_class}")


def make_radiograph(kind: str, rng: np.random.Generator, cfg: Synth2DConfig) -> np.ndarray:
    """One lateral cervical-spine image.

    Args:
        kind: ``normal``, ``fracture`` or ``dislocation``.
        rng: the image's random generator.
        cfg: size, noise, contrast and severity.

    Returns:
        ``(size, size)`` float32 in [0, 1].
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; expected one of {KINDS}")
    s = cfg.size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    centre_x = s * rng.uniform(0.42, 0.58)
    image = 0.08 + 0.06 * rng.random() + 0.05 * yy / s  # exposure gradient
    image = image + rng.uniform(0.12, 0.2) * np.exp(-0.5 * ((xx - centre_x) / (s * rng.uniform(0.18, 0.24))) ** 2)

    width = s * rng.uniform(0.14, 0.17)
    height = s * rng.uniform(0.075, 0.09)
    disc = s * rng.uniform(0.025, 0.035)
    top = s * rng.uniform(0.05, 0.1)
    lordosis = s * rng.uniform(0.0, 0.06)
    bone = cfg.contrast * rng.uniform(0.85, 1.1)
    severity = cfg.severity

    wedged = int(rng.integers(1, 7)) if kind == "fracture" else -1
    shifted_from = int(rng.integers(2, 7)) if kind == "dislocation" else 7
    shift = -severity * width * rng.uniform(0.3, 0.45)  # anterior = towards smaller x

    y = top
    for level in range(7):
        if level == shifted_from:
            y += disc * severity * 0.8  # the disrupted disc space opens
        cx = centre_x - lordosis * np.sin(np.pi * level / 6) + (shift if level >= shifted_from else 0.0)
        cy = y + height / 2
        tilt = np.deg2rad(rng.normal(0, 4))
        u = (xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)
        v = -(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)
        # Anterior wedge: the superior end plate drops towards the front (u < 0) by up to `wedge` × height.
        wedge = min(0.45 * severity, 0.8) if level == wedged else 0.0
        drop = wedge * height * np.clip(0.5 - u / width, 0.0, 1.0)
        half = height / 2 - drop / 2
        r = (np.abs(u) / (width / 2)) ** 4 + (np.abs(v - drop / 2) / np.maximum(half, 0.5)) ** 4
        body = r <= 1
        level_bone = bone * rng.uniform(0.9, 1.05)
        image = image + np.where(body, level_bone * np.where(r > 0.5, 1.0, 0.72), 0.0)
        # Posterior elements: a dimmer pillar and spinous process behind the body.
        pr = ((u - 0.8 * width) / (0.33 * width)) ** 2 + (v / (0.42 * height)) ** 2
        sp = ((u - 1.25 * width) / (0.3 * width)) ** 2 + ((v - 0.2 * height) / (0.22 * height)) ** 2
        image = image + level_bone * (0.45 * (pr <= 1) + 0.35 * (sp <= 1))
        if level == wedged:
            angle = np.deg2rad(rng.uniform(-35, 35))
            distance = np.abs((xx - cx) * np.sin(angle) - (yy - cy - rng.uniform(-0.15, 0.15) * height) * np.cos(angle))
            thickness = max(1.0, 0.02 * s * severity)
            image = image - np.where(body & (distance < thickness / 2), 0.85 * level_bone, 0.0)
        y += height + disc

    image = gaussian_filter(image, sigma=0.5 * s / 128)
    image = image + rng.normal(0.0, cfg.noise, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def write_dicom(path: str | Path, image: np.ndarray) -> Path:
    """Write an image in [0, 1] as an uncompressed single-frame DICOM with HU-like stored values.

    Args:
        path: destination ``.dcm``.
        image: ``(H, W)`` in [0, 1].
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CSPINE"
    ds.RescaleSlope = 1.0
    ds.RescaleIntercept = 0.0
    stored = np.round(np.asarray(image, dtype=np.float64) * _DICOM_SCALE + _DICOM_OFFSET).astype(np.int16)
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image_folder(out_dir: str | Path, cfg: Synth2DConfig) -> pd.DataFrame:
    """Write ``out_dir/<class>/<class>_<i>.png`` (or ``.dcm``) and ``out_dir/labels.csv`` (path,label).

    Args:
        out_dir: output folder (created).
        cfg: generator settings.

    Returns:
        The ``labels.csv`` table (paths relative to ``out_dir``).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    rows = []
    jobs = [(c, i) for c in cfg.classes for i in range(cfg.per_class)]
    for kind, i in tqdm(jobs, desc="synth-2d", leave=False, disable=None):
        rng = np.random.default_rng(np.random.SeedSequence((cfg.seed, KINDS.index(kind), i)))
        image = make_radiograph(kind, rng, cfg)
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        if i < cfg.dicom_per_class:
            path = write_dicom(folder / f"{kind}_{i:04d}.dcm", image)
        else:
            path = folder / f"{kind}_{i:04d}.png"
            Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(path)
        rows.append((path.relative_to(out_dir).as_posix(), kind))
    table = pd.DataFrame(rows, columns=["path", "label"])
    table.to_csv(out_dir / "labels.csv", index=False)
    log.info("wrote %d synthetic images of %s to %s", len(table), list(cfg.classes), out_dir)
    return table

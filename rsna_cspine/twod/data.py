"""2D training data: the image index (class folders or a ``path,label`` CSV), image decoding, and the dataset.

PNG/JPEG/TIFF/BMP are read with Pillow; DICOM through the project's reader
(:func:`rsna_cspine.io.dicom.read_slice_hu`) and windowed from HU. Every image is decoded once by
:func:`check_images` before training, so an unreadable file stops the run up front with its name (or is
skipped with a warning that lists it), never half-way through an epoch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rsna_cspine.errors import CSpineError, LayoutError
from rsna_cspine.io.dicom import read_slice_hu
from rsna_cspine.io.window import window_hu
from rsna_cspine.training.augment import StackAugment, item_seed

log = logging.getLogger(__name__)

PILLOW_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: frozenset[str] = PILLOW_SUFFIXES | DICOM_SUFFIXES
INDEX_COLUMNS: tuple[str, ...] = ("path", "label", "target")


@dataclass
class ImageIndex:
    """The images of a dataset and their classes.

    Attributes:
        frame: one row per image: ``path`` (absolute), ``label`` (class name), ``target`` (class number).
        classes: class names in sorted order; ``target`` indexes this list.
        skipped: ``(path, reason)`` of images left out because they could not be read.
    """

    frame: pd.DataFrame
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def index_images(source: str | Path) -> ImageIndex:
    """List the images of a class-folder tree or of a ``path,label`` CSV.

    Args:
        source: a folder holding one sub-folder per class (images anywhere below it), or a CSV file with
            columns ``path`` and ``label`` (relative paths are relative to the CSV's folder).

    Raises:
        LayoutError: the source is missing, a CSV lacks its columns or names missing files, or fewer
            than two classes have images.
    """
    source = Path(source)
    if source.is_file():
        frame = _index_csv(source)
    elif source.is_dir():
        frame = _index_folders(source)
    else:
        raise LayoutError("image source not found (expected a folder of class folders or a path,label CSV)", source)
    classes = sorted(frame["label"].unique().tolist())
    if len(classes) < 2:
        raise LayoutError(f"need images of at least two classes, found {classes}", source)
    frame["target"] = frame["label"].map({name: i for i, name in enumerate(classes)}).astype(np.int64)
    frame = frame.sort_values(["target", "path"], kind="stable").reset_index(drop=True)
    return ImageIndex(frame=frame[list(INDEX_COLUMNS)], classes=classes)


def _index_folders(root: Path) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((str(path.resolve()), class_dir.name))
    if not rows:
        raise LayoutError(f"no class sub-folder with images ({', '.join(sorted(IMAGE_SUFFIXES))})", root)
    return pd.DataFrame(rows, columns=["path", "label"])


def _index_csv(csv_path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(csv_path, dtype={"path": str, "label": str}, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LayoutError(f"not a readable CSV ({exc})", csv_path) from exc
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise LayoutError(f"missing column(s) {missing}; found {list(frame.columns)}", csv_path)
    frame = frame[["path", "label"]].copy()
    frame["label"] = frame["label"].str.strip()
    if (frame["label"] == "").any() or (frame["path"].str.strip() == "").any():
        raise LayoutError("rows with an empty path or label", csv_path)
    base = csv_path.resolve().parent
    frame["path"] = [str(p if p.is_absolute() else (base / p).resolve()) for p in map(Path, frame["path"].str.strip())]
    absent = [p for p in frame["path"] if not Path(p).is_file()]
    if absent:
        raise LayoutError(f"{len(absent)} listed image(s) do not exist, e.g. {absent[:3]}", csv_path)
    duplicated = frame["path"][frame["path"].duplicated()].unique()
    if len(duplicated):
        raise LayoutError(f"images listed more than once, e.g. {list(duplicated[:3])}", csv_path)
    return frame


def read_image(
    path: str | Path, in_chans: int, size: int, dicom_window: tuple[float, float] | None = (-400.0, 1500.0)
) -> np.ndarray:
    """Decode one image to ``(in_chans, size, size)`` float32 in [0, 1].

    Args:
        path: PNG/JPEG/TIFF/BMP (read by Pillow) or DICOM (read by the project's reader, in HU).
        in_chans: 1 (grey) or 3 (colour kept; grey repeated).
        size: output side; the image is resized (antialiased bilinear) without keeping its aspect ratio.
        dicom_window: HU window for DICOM; None scales by the image's own 0.5–99.5th percentiles.

    Raises:
        LayoutError: Pillow cannot read the file, or it has an unknown suffix.
        DicomSeriesError: the DICOM file cannot be decoded.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        grey = _window(read_slice_hu(path), dicom_window)
        planes = grey[None]
    elif suffix in PILLOW_SUFFIXES:
        planes = _read_pillow(path, colour=in_chans == 3)
    else:
        raise LayoutError(f"unsupported image type {suffix!r}; expected one of {sorted(IMAGE_SUFFIXES)}", path)
    if not np.isfinite(planes).all():
        raise LayoutError("image has non-finite values", path)
    tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if resized.shape[0] != in_chans:
        resized = resized.mean(0, keepdim=True).repeat(in_chans, 1, 1)
    return resized.clamp_(0.0, 1.0).numpy()


def _read_pillow(path: Path, colour: bool) -> np.ndarray:
    """``(C, H, W)`` in [0, 1]; 16-bit greys are scaled by their own bit range."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                    grey = np.asarray(image, dtype=np.float32)
                    peak = 65535.0 if grey.max() > 255 else 255.0
                    return (grey / peak)[None]
                converted = image.convert("RGB" if colour else "L")
                array = np.asarray(converted, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise LayoutError(f"unreadable image ({exc.__class__.__name__}: {exc})", path) from exc
    return array.transpose(2, 0, 1) if array.ndim == 3 else array[None]


def _window(hu: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is None:
        low, high = np.percentile(hu, [0.5, 99.5])
        if high <= low:
            return np.zeros_like(hu, dtype=np.float32)
    else:
        low, high = window
    return window_hu(hu, (low, high))


def check_images(
    index: ImageIndex,
    in_chans: int,
    size: int,
    dicom_window: tuple[float, float] | None,
    skip_unreadable: bool = False,
    keep: bool = False,
) -> tuple[ImageIndex, list[np.ndarray] | None]:
    """Decode every image once: stop at the first unreadable one, or list and drop them.

    Args:
        index: from :func:`index_images`.
        in_chans: channels the model takes.
        size: side the images are resized to.
        dicom_window: HU window for DICOM files (see :func:`read_image`).
        skip_unreadable: drop unreadable images with a warning that names them instead of raising.
        keep: also return the decoded images (in the returned index's row order).

    Returns:
        The index without unreadable images (``skipped`` lists them) and the decoded images when ``keep``.

    Raises:
        CSpineError: an image cannot be read (its path and the cause in the message) and
            ``skip_unreadable`` is off, or a class has no readable image left.
    """
    decoded: list[np.ndarray] = []
    ok: list[int] = []
    skipped = list(index.skipped)
    for i, path in enumerate(tqdm(index.frame["path"], desc="check images", leave=False, disable=None)):
        try:
            image = read_image(path, in_chans, size, dicom_window)
        except CSpineError as exc:
            if not skip_unreadable:
                raise
            skipped.append((str(path), exc.reason))
            continue
        ok.append(i)
        if keep:
            decoded.append(image)
    if len(skipped) > len(index.skipped):
        new = skipped[len(index.skipped):]
        log.warning("skipped %d unreadable image(s): %s", len(new), "; ".join(f"{p} ({r})" for p, r in new))
    frame = index.frame.iloc[ok].reset_index(drop=True)
    empty = [c for i, c in enumerate(index.classes) if not (frame["target"] == i).any()]
    if empty:
        raise LayoutError(f"class(es) {empty} have no readable image")
    return ImageIndex(frame=frame, classes=index.classes, skipped=skipped), (decoded if keep else None)


class ImageDataset(Dataset):
    """Rows of an :class:`ImageIndex` frame → ``{"image" (C, S, S) float32 in [0, 1], "target", "index"}``.

    Augmentation is the shared :class:`~rsna_cspine.training.augment.StackAugment` (random resized crop,
    flips, rotation, intensity) on a one-slice stack, seeded per (seed, epoch, item).

    Args:
        frame: rows with ``path`` and ``target``.
        in_chans: channels per image.
        size: image side.
        dicom_window: HU window for DICOM files.
        augment: training augmentation, or None.
        seed: run seed.
        images: already decoded images in row order (skips decoding), or None.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        in_chans: int,
        size: int,
        dicom_window: tuple[float, float] | None,
        augment: StackAugment | None = None,
        seed: int = 0,
        images: list[np.ndarray] | None = None,
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        if images is not None and len(images) != len(self.frame):
            raise ValueError(f"{len(images)} decoded images for {len(self.frame)} rows")
        self.in_chans, self.size, self.dicom_window = in_chans, size, dicom_window
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.images = images

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws are used."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.images is not None:
            array = self.images[index]
        else:
            array = read_image(self.frame.at[index, "path"], self.in_chans, self.size, self.dicom_window)
        image = torch.from_numpy(array.copy())
        if self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, index))
                image = self.augment(image[None])[0]
        return {
            "image": image,
            "target": torch.tensor(int(self.frame.at[index, "target"])),
            "index": torch.tensor(index),
        }

"""2D training data: the image index (class folders or a ``path,label`` CSV), image decoding, and the dataset.

PNG/JPEG/TIFF/BMP are read with Pillow; DICOM through the project's reader
(:func:`rsna_cspine.io.dicom.read_slice_hu`) and windowed from HU. Every image is decoded once by
:func:`check_images` before training, so an unreadable file stops the run up front with its name (or is
skipped with a warning that lists it), never half-way through an epoch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
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
#: A step applied to every decoded ``(C, S, S)`` image (e.g. the column mask).
ImageTransform = Callable[[np.ndarray], np.ndarray]
INDEX_COLUMNS: tuple[str, ...] = ("path", "label", "target", "study", "slice")


@dataclass
class ImageIndex:
    """The images of a dataset and their classes.

    Attributes:
        frame: one row per image: ``path`` (absolute), ``label`` (class name), ``target`` (class number),
            ``study`` (the study it belongs to; an image without one is its own study) and ``slice`` (its
            place in the study: the CSV's ``slice`` column, else the order of the paths).
        classes: class names in output order (``data.class_order``, else sorted); ``target`` indexes this list.
        skipped: ``(path, reason)`` of images left out because they could not be read.
    """

    frame: pd.DataFrame
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_studies(self) -> bool:
        """Whether some study holds more than one image (then per-study predictions and metrics are made)."""
        return bool(self.frame["study"].duplicated().any())


def index_images(source: str | Path, label_column: str = "label",
                 class_order: tuple[str, ...] | list[str] | None = None) -> ImageIndex:
    """List the images of a class-folder tree or of a ``path,label`` CSV.

    Args:
        source: a folder holding one sub-folder per class (images directly in it are studies of their own;
            images in a sub-folder of a class folder form the study named after that sub-folder), or a CSV
            file with columns ``path`` and ``label_column`` and optionally ``study`` and ``slice``
            (relative paths are relative to the CSV's folder).
        label_column: the CSV column holding the class.
        class_order: the classes in output order (a class without images stays an output, with a warning);
            None sorts them by name.

    Raises:
        LayoutError: the source is missing, a CSV lacks its columns or names missing files, fewer than two
            classes have images, a label is missing from ``class_order``, or a study's images carry
            different classes.
    """
    source = Path(source)
    if source.is_file():
        frame = _index_csv(source, label_column)
    elif source.is_dir():
        frame = _index_folders(source)
    else:
        raise LayoutError("image source not found (expected a folder of class folders or a path,label CSV)", source)
    found = sorted(frame["label"].unique().tolist())
    if class_order is not None:
        unknown = sorted(set(found) - set(class_order))
        if unknown:
            raise LayoutError(f"labels {unknown} are not in data.class_order {list(class_order)}", source)
        unused = [c for c in class_order if c not in found]
        if unused:
            log.warning("%s: no image of class(es) %s of data.class_order (they stay model outputs)", source, unused)
        classes = list(class_order)
    else:
        classes = found
    if len(found) < 2:
        raise LayoutError(f"need images of at least two classes, found {found}", source)
    frame["target"] = frame["label"].map({name: i for i, name in enumerate(classes)}).astype(np.int64)
    mixed = frame.groupby("study")["target"].nunique()
    if (mixed > 1).any():
        raise LayoutError(f"{int((mixed > 1).sum())} studies hold images of several classes, e.g. "
                          f"{mixed[mixed > 1].index[:3].tolist()} (a study has one label)", source)
    if "slice" not in frame.columns:
        frame = frame.sort_values("path", kind="stable")
        frame["slice"] = frame.groupby("study").cumcount()
    frame = frame.sort_values(["target", "path"], kind="stable").reset_index(drop=True)
    return ImageIndex(frame=frame[list(INDEX_COLUMNS)], classes=classes)


def _index_folders(root: Path) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                parts = path.relative_to(class_dir).parts
                study = f"{class_dir.name}/{parts[0]}" if len(parts) > 1 else str(path.resolve())
                rows.append((str(path.resolve()), class_dir.name, study))
    if not rows:
        raise LayoutError(f"no class sub-folder with images ({', '.join(sorted(IMAGE_SUFFIXES))})", root)
    return pd.DataFrame(rows, columns=["path", "label", "study"])


def _index_csv(csv_path: Path, label_column: str = "label") -> pd.DataFrame:
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LayoutError(f"not a readable CSV ({exc})", csv_path) from exc
    missing = [c for c in ("path", label_column) if c not in frame.columns]
    if missing:
        raise LayoutError(f"missing column(s) {missing}; found {list(frame.columns)}", csv_path)
    kept = ["path", label_column] + [c for c in ("study", "slice") if c in frame.columns]
    frame = frame[kept].rename(columns={label_column: "label"}).copy()
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
    if "study" in frame.columns:
        frame["study"] = frame["study"].str.strip()
        frame.loc[frame["study"] == "", "study"] = frame["path"]  # no study: the image is its own
    else:
        frame["study"] = frame["path"]
    if "slice" in frame.columns:
        try:
            frame["slice"] = pd.to_numeric(frame["slice"]).astype(np.float64)
        except ValueError as exc:
            raise LayoutError(f"the slice column must hold numbers ({exc})", csv_path) from exc
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
    transform: ImageTransform | None = None,
) -> tuple[ImageIndex, list[np.ndarray] | None]:
    """Decode every image once: stop at the first unreadable one, or list and drop them.

    Args:
        index: from :func:`index_images`.
        in_chans: channels the model takes.
        size: side the images are resized to.
        dicom_window: HU window for DICOM files (see :func:`read_image`).
        skip_unreadable: drop unreadable images with a warning that names them instead of raising.
        keep: also return the decoded images (in the returned index's row order).
        transform: applied to each decoded image before it is kept (the column mask of ``data.mask_with``).

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
            if keep and transform is not None:
                image = transform(image)
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
    had = set(index.frame["target"].tolist())
    empty = [c for i, c in enumerate(index.classes) if i in had and not (frame["target"] == i).any()]
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
        transform: applied to each image decoded here (not to ``images``, which come transformed).
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
        transform: ImageTransform | None = None,
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        if images is not None and len(images) != len(self.frame):
            raise ValueError(f"{len(images)} decoded images for {len(self.frame)} rows")
        self.in_chans, self.size, self.dicom_window = in_chans, size, dicom_window
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.images = images
        self.transform = transform

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
            if self.transform is not None:
                array = self.transform(array)
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

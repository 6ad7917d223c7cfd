"""The pictures of ``explain``: segmentation overlays, crop montages and Grad-CAM, oriented for reading.

Display conventions: axial images in radiological orientation (anterior up, patient's right on the
viewer's left), sagittal images with superior up and anterior on the left, both with their true
pixel aspect from the DICOM spacing. Crop montages and Grad-CAM are shown exactly as the classifier
received them, so the heat map lies where the network looked.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.crops.extract import CropConfig, VertebraCrops, to_unit_float
from rsna_cspine.io.volume import Volume
from rsna_cspine.io.window import window_hu

#: One colour per vertebra label 1..7 (C1..C7), shared by every picture and the web page.
LABEL_COLOURS: np.ndarray = np.asarray(colormaps["tab10"].colors[:7], dtype=np.float32)
#: Picture kinds written per vertebra, in the order a viewer shows them.
PICTURES: tuple[str, ...] = ("views", "crops", "gradcam")

_DPI = 100


# ----------------------------------------------------------------------------------------------
# Orientation and colour
# ----------------------------------------------------------------------------------------------


def display_flips(volume: Volume) -> tuple[bool, bool]:
    """Which image axes to flip so that an axial slice shows anterior up and the patient's right on the left.

    Args:
        volume: the study (its row/column direction cosines, LPS).

    Returns:
        ``(flip_rows, flip_columns)``: rows must run anterior → posterior (+P), columns right → left (+L).
    """
    return bool(np.asarray(volume.col_cosine)[1] < 0), bool(np.asarray(volume.row_cosine)[0] < 0)


def window_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Hounsfield units → [0, 1] grey levels through a ``(low, high)`` window.

    Args:
        hu: any array of HU.
        window: ``(low, high)``.
    """
    return window_hu(np.asarray(hu), window)


def overlay_labels(grey: np.ndarray, labels: np.ndarray, highlight: int | None = None, alpha: float = 0.3) -> np.ndarray:
    """Colour the vertebra labels over a grey image.

    Args:
        grey: ``(h, w)`` in [0, 1].
        labels: ``(h, w)`` integer labels (1..7 = C1..C7; other values are left grey).
        highlight: label drawn stronger than the others (the vertebra being explained).
        alpha: opacity of the other labels' colours (the highlighted one gets twice as much, at most 0.8).

    Returns:
        ``(h, w, 3)`` float32 RGB in [0, 1].
    """
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=-1)
    labels = np.asarray(labels)
    for label in range(1, len(VERTEBRAE) + 1):
        where = labels == label
        if not where.any():
            continue
        a = min(0.8, 2 * alpha) if label == highlight else alpha
        rgb[where] = (1 - a) * rgb[where] + a * LABEL_COLOURS[label - 1]
    return rgb


def probability_text(vertebra: str, probability: float, found: bool, verdict: str = "") -> str:
    """Picture title: the vertebra and its probability, or that it was not found (or dropped by stage 1's
    quality check, with the reason on a second line) and took the prior."""
    if found:
        return f"{vertebra}: p(fracture) = {probability:.3f}"
    if verdict.startswith("dropped"):
        return f"{vertebra}: dropped by the QC, prior p = {probability:.3f}\n({verdict.partition(': ')[2]})"
    return f"{vertebra}: not found, prior p = {probability:.3f}"


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------


def sagittal_view(volume: Volume, mask: np.ndarray, x: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(z, y)`` plane at image column ``x`` as displayed: superior at the top, anterior on the left.

    Args:
        volume: the study.
        mask: ``(z, y, x)`` labels aligned with ``volume.hu``.
        x: image column (0-based).

    Returns:
        ``(hu, labels)``, both ``(z, y)``.
    """
    plane, labels = volume.hu[:, :, x], mask[:, :, x]
    if display_flips(volume)[0]:
        plane, labels = plane[:, ::-1], labels[:, ::-1]
    return plane, labels


def axial_view(volume: Volume, mask: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``z`` as displayed: anterior at the top, the patient's right on the viewer's left.

    Args:
        volume: the study.
        mask: ``(z, y, x)`` labels aligned with ``volume.hu``.
        z: slice index (0 = most superior).

    Returns:
        ``(hu, labels)``, both ``(y, x)``.
    """
    plane, labels = volume.hu[z], mask[z]
    flip_rows, flip_cols = display_flips(volume)
    if flip_rows:
        plane, labels = plane[::-1], labels[::-1]
    if flip_cols:
        plane, labels = plane[:, ::-1], labels[:, ::-1]
    return plane, labels


def _flip_interval(lo: float, hi: float, n: int, flip: bool) -> tuple[float, float]:
    """An index interval ``[lo, hi)`` after flipping an axis of length ``n``."""
    return (n - hi, n - lo) if flip else (lo, hi)


def _cervical_extent(crops: VertebraCrops, shape: tuple[int, int, int], margin_mm: float, spacing: Sequence[float]) -> tuple[int, int, int, int]:
    """``(z0, z1, y0, y1)`` around every found vertebra plus a margin, clipped to the volume."""
    present = np.flatnonzero(crops.present)
    if not len(present):
        return 0, shape[0], 0, shape[1]
    dz, dy = float(spacing[0]), float(spacing[1])
    z0 = int(crops.z_range[present, 0].min() - margin_mm / dz)
    z1 = int(crops.z_range[present, 1].max() + 1 + margin_mm / dz)
    y0 = int(crops.boxes[present, 0].min() - margin_mm / dy)
    y1 = int(crops.boxes[present, 1].max() + margin_mm / dy)
    return max(z0, 0), min(z1, shape[0]), max(y0, 0), min(y1, shape[1])


def _spine_column(crops: VertebraCrops, width: int) -> int:
    """Image column through the middle of the found vertebrae (the mid-sagittal plane)."""
    present = np.flatnonzero(crops.present)
    if not len(present):
        return width // 2
    centres = (crops.boxes[present, 2] + crops.boxes[present, 3]) / 2.0
    return int(np.clip(round(float(np.median(centres))), 0, width - 1))


def render_views(
    volume: Volume,
    mask: np.ndarray,
    crops: VertebraCrops,
    index: int,
    probability: float,
    out_path: str | Path,
    window: tuple[float, float] = (-400.0, 1500.0),
    verdict: str = "",
) -> Path:
    """Mid-sagittal and axial views through one vertebra with the segmentation overlay.

    Args:
        volume: the study.
        mask: ``(z, y, x)`` stage-1 labels aligned with ``volume.hu``.
        crops: the study's stacks (for the vertebra's extent and crop box).
        index: 0-based vertebra (0 = C1).
        probability: printed in the title.
        out_path: PNG to write.
        window: HU display window.
        verdict: stage 1's quality-check verdict (``ok``, ``absent`` or ``dropped: reason``), for the title.
    """
    vertebra = VERTEBRAE[index]
    found = bool(crops.present[index])
    n_z, n_y, n_x = volume.shape
    dz, dy, dx = (float(s) for s in volume.spacing)
    flips = display_flips(volume)
    if found:
        y0, y1, x0, x1 = (int(v) for v in crops.boxes[index])
        x = int(np.clip((x0 + x1) // 2, 0, n_x - 1))
        z = int(round(float(np.mean(crops.z_range[index]))))
    else:
        x, z = _spine_column(crops, n_x), _gap_slice(crops, index, n_z)
    fig = Figure(figsize=(11, 5.6))
    ax_sag, ax_ax = fig.subplots(1, 2, width_ratios=(1, 1))

    sag, sag_labels = sagittal_view(volume, mask, x)
    ez0, ez1, ey0, ey1 = _cervical_extent(crops, volume.shape, 20.0, volume.spacing)
    ey0, ey1 = _flip_interval(ey0, ey1, n_y, flips[0])
    view = overlay_labels(window_to_unit(sag, window), sag_labels, highlight=index + 1)
    ax_sag.imshow(view, aspect=dz / dy, interpolation="nearest")
    if found:
        _outline(ax_sag, sag_labels == index + 1)
        ax_sag.axhline(z, color="yellow", linestyle="--", linewidth=0.8)
    ax_sag.set_xlim(ey0 - 0.5, ey1 - 0.5)
    ax_sag.set_ylim(ez1 - 0.5, ez0 - 0.5)
    ax_sag.set_title(_sagittal_title(x, n_z), fontsize=9)
    ax_sag.set_xticks([])
    ax_sag.set_ylabel("slice (superior at top)")

    ax_img, ax_labels = axial_view(volume, mask, z)
    ax_ax.imshow(overlay_labels(window_to_unit(ax_img, window), ax_labels, highlight=index + 1),
                 aspect=dy / dx, interpolation="nearest")
    if found:
        _outline(ax_ax, ax_labels == index + 1)
        by0, by1 = _flip_interval(y0, y1, n_y, flips[0])
        bx0, bx1 = _flip_interval(x0, x1, n_x, flips[1])
        ax_ax.add_patch(Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0, by1 - by0, fill=False, edgecolor="yellow",
                                  linestyle="--", linewidth=1.0))
        ax_ax.set_xlim(-0.5, n_x - 0.5)
        ax_ax.set_ylim(n_y - 0.5, -0.5)
    where = "R on left; dashed: crop box" if found else "R on left; where the vertebra was expected"
    ax_ax.set_title(f"axial, slice {z} ({where})", fontsize=9)
    ax_ax.set_xticks([])
    ax_ax.set_yticks([])
    fig.legend(handles=_legend(), loc="lower center", ncol=7, fontsize=8, frameon=False)
    title = probability_text(vertebra, probability, found, verdict)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.84 if "\n" in title else 0.88, bottom=0.1, wspace=0.08)
    return _save(fig, out_path)


def _gap_slice(crops: VertebraCrops, index: int, n_z: int) -> int:
    """For a vertebra stage 1 did not find: the slice midway between its found neighbours."""
    above = [crops.z_range[i, 1] for i in range(index) if crops.present[i]]
    below = [crops.z_range[i, 0] for i in range(index + 1, len(crops.present)) if crops.present[i]]
    top = int(above[-1]) if above else 0
    bottom = int(below[0]) if below else n_z - 1
    return int(np.clip((top + bottom) // 2, 0, n_z - 1))


def _outline(ax, region: np.ndarray) -> None:
    """White contour around a boolean region (nothing when the plane misses it).

    The region is padded with one empty pixel on every side: matplotlib's contour needs a grid of at least
    2 × 2, which a plane one pixel thin (the sagittal plane of a one-slice study) is not, and a region
    touching the image edge then still gets a closed outline.
    """
    if region.any():
        padded = np.pad(region.astype(np.float32), 1)
        rows, cols = padded.shape
        ax.contour(np.arange(-1, cols - 1), np.arange(-1, rows - 1), padded, levels=[0.5], colors=["white"],
                   linewidths=1.0)


def _sagittal_title(x: int, n_slices: int) -> str:
    """Title of a sagittal plane; a one-slice study's plane is a single row, and the title says so."""
    thin = "; one slice, so the plane is one row high" if n_slices == 1 else ""
    return f"sagittal, column {x} (anterior left{thin})"


def _legend() -> list[Patch]:
    return [Patch(color=LABEL_COLOURS[i], label=v) for i, v in enumerate(VERTEBRAE)]


def centre_channel(cfg: CropConfig) -> int:
    """Channel of a stack that holds the centre slice itself in the first intensity window.

    Args:
        cfg: the crop geometry the stack was cut with.
    """
    return cfg.channels // 2


def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n * 1.5)))
    return int(np.ceil(n / cols)), cols


def render_montage(
    stack: np.ndarray,
    slice_index: Sequence[int],
    title: str,
    out_path: str | Path,
    channel: int,
    cam: np.ndarray | None = None,
) -> Path:
    """One vertebra's stack as a grid of tiles (one per slice), optionally with a heat map on top.

    Args:
        stack: ``(N, C, S, S)`` as cut by ``extract_vertebra_crops`` (uint8 or float).
        slice_index: volume slice of each tile (printed on it).
        title: figure title (vertebra and probability).
        out_path: PNG to write.
        channel: channel shown in grey (the centre slice, see :func:`centre_channel`).
        cam: ``(N, S, S)`` in [0, 1]; drawn with the jet colour map where it is above 0.
    """
    images = to_unit_float(np.asarray(stack))[:, channel]
    n = len(images)
    rows, cols = _grid(n)
    fig = Figure(figsize=(1.9 * cols + (0.9 if cam is not None else 0.3), 2.0 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    heat = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(images[k], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if cam is not None:
            # Opacity follows the heat, so cold regions leave the anatomy readable.
            heat = ax.imshow(cam[k], cmap="jet", vmin=0.0, vmax=1.0, alpha=np.clip(0.7 * cam[k], 0.0, 0.6), interpolation="bilinear")
        ax.set_title(f"slice {int(slice_index[k])}", fontsize=8)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.subplots_adjust(left=0.02, right=0.88 if cam is not None else 0.98, top=1 - 0.75 / fig.get_figheight(),
                        bottom=0.02, wspace=0.05, hspace=0.2)
    if heat is not None:
        bar_ax = fig.add_axes((0.9, 0.1, 0.02, 0.7))
        fig.colorbar(heat, cax=bar_ax, label="Grad-CAM (stack max = 1)")
    return _save(fig, out_path)


def render_overview(
    volume: Volume,
    mask: np.ndarray,
    crops: VertebraCrops,
    probabilities: Sequence[float],
    out_path: str | Path,
    window: tuple[float, float] = (-400.0, 1500.0),
    vertebrae: pd.DataFrame | None = None,
) -> Path:
    """Mid-sagittal plane of the cervical spine, each vertebra labelled with its probability.

    With stage 1's table (``vertebrae``, holding the quality check's ``qc``), a vertebra the check dropped
    is marked where the network had put it (a red cross) and its label says why it took the prior.

    Args:
        volume: the study.
        mask: ``(z, y, x)`` stage-1 labels.
        crops: the study's stacks (extents and boxes of the found vertebrae).
        probabilities: ``(8,)`` in ``TARGET_COLUMNS`` order.
        out_path: PNG to write.
        window: HU display window.
        vertebrae: stage 1's per-vertebra table with ``qc`` (optional).
    """
    n_z, n_y, n_x = volume.shape
    dz, dy, _ = (float(s) for s in volume.spacing)
    flips = display_flips(volume)
    verdicts = [str(v) for v in vertebrae["qc"]] if vertebrae is not None and "qc" in vertebrae else [""] * len(VERTEBRAE)
    dropped = {i: (float(vertebrae.iloc[i]["centroid_z"]), float(vertebrae.iloc[i]["centroid_y"]))
               for i, v in enumerate(verdicts) if v.startswith("dropped")}
    x = _spine_column(crops, n_x)
    sag, labels = sagittal_view(volume, mask, x)
    z0, z1, y0, y1 = _cervical_extent(crops, volume.shape, 25.0, volume.spacing)
    if dropped:  # show where the dropped ones were, however far from the kept ones
        zs, ys = np.array(list(dropped.values())).T
        z0, z1 = max(min(z0, int(zs.min() - 25.0 / dz)), 0), min(max(z1, int(zs.max() + 25.0 / dz)), n_z)
        y0, y1 = max(min(y0, int(ys.min() - 25.0 / dy)), 0), min(max(y1, int(ys.max() + 25.0 / dy)), n_y)
    y0, y1 = _flip_interval(y0, y1, n_y, flips[0])
    # The figure takes the shape of the shown region in mm, so the title sits on the image.
    height_in = float(np.clip(6.0 * (z1 - z0) * dz / max((y1 - y0) * dy, 1e-6), 3.0, 10.0))
    fig = Figure(figsize=(6.5, height_in + 0.8))
    ax = fig.subplots()
    ax.imshow(overlay_labels(window_to_unit(sag, window), labels), aspect=dz / dy, interpolation="nearest")
    ax.set_xlim(y0 - 0.5, y1 - 0.5)
    ax.set_ylim(z1 - 0.5, z0 - 0.5)
    present = np.asarray(crops.present, dtype=bool)
    centres = np.where(present, crops.z_range.mean(axis=1), np.nan)
    for i, (cz, _) in dropped.items():
        centres[i] = cz
    label_z = _label_positions(centres, z0, z1)
    for i, vertebra in enumerate(VERTEBRAE):
        text = f"{vertebra} {probabilities[i]:.3f}" + ("" if present[i] else " (QC: dropped)" if i in dropped
                                                      else " (not found)")
        style = {"facecolor": LABEL_COLOURS[i], "alpha": 0.85 if present[i] else 0.4, "edgecolor": "none", "pad": 2}
        # Labels sit in a column at the right edge, behind the spine, with a leader to their vertebra.
        arrow = None
        target = (y1 - 2, label_z[i])
        if present[i]:
            box_y = _flip_interval(crops.boxes[i, 0], crops.boxes[i, 1], n_y, flips[0])
            target = (float(np.mean(box_y)), float(centres[i]))
            arrow = {"arrowstyle": "-", "color": LABEL_COLOURS[i], "linewidth": 1.0}
        elif i in dropped:
            cz, cy = dropped[i]
            target = (n_y - 1 - cy if flips[0] else cy, cz)
            ax.plot(*target, marker="x", color="red", markersize=12, markeredgewidth=2.5)
            style = {**style, "edgecolor": "red", "linewidth": 1.5}
            arrow = {"arrowstyle": "-", "color": "red", "linewidth": 1.0, "linestyle": "--"}
        ax.annotate(text, xy=target, xytext=(y1 - 2, label_z[i]), color="white", fontsize=10, va="center",
                    ha="right", bbox=style, arrowprops=arrow)
    ax.set_xticks([])
    ax.set_ylabel("slice (superior at top)")
    ax.set_title(_sagittal_title(x, n_z), fontsize=9)
    fig.suptitle(f"patient_overall: p(fracture) = {probabilities[-1]:.3f}", fontsize=14, fontweight="bold")
    reasons = [f"{VERTEBRAE[i]} {verdicts[i]}" for i in sorted(dropped)]
    if reasons:  # why each red cross took the prior, under the picture
        fig.text(0.5, 0.0, "\n".join(textwrap.shorten(r, 110) for r in reasons), ha="center", va="top", fontsize=8,
                 color="darkred")
    fig.subplots_adjust(left=0.12, right=0.98, top=0.92, bottom=0.03)
    return _save(fig, out_path, tight=True)


def _label_positions(centres: np.ndarray, low: float, high: float) -> np.ndarray:
    """Heights for seven labels in C1..C7 order: at their vertebra when found, never overlapping.

    Args:
        centres: ``(7,)`` slice of each vertebra's middle, NaN when not found.
        low: top of the visible range (slice index).
        high: bottom of the visible range.
    """
    n = len(centres)
    gap = (high - low) / (n + 2)
    index = np.arange(n)
    known = np.isfinite(centres)
    if known.any():
        # Missing vertebrae go between their found neighbours (C1..C7 run top to bottom).
        wanted = np.interp(index, index[known], centres[known])
        first, last = index[known][0], index[known][-1]
        wanted[:first] = centres[first] - gap * (first - index[:first])
        wanted[last + 1 :] = centres[last] + gap * (index[last + 1 :] - last)
    else:
        wanted = low + gap * (index + 1.5)
    positions = wanted.astype(np.float64)
    positions[0] = max(positions[0], low + gap / 2)
    for k in range(1, n):
        positions[k] = max(positions[k], positions[k - 1] + gap)
    positions[-1] = min(positions[-1], high - gap / 2)
    for k in range(n - 2, -1, -1):
        positions[k] = min(positions[k], positions[k + 1] - gap)
    return positions


def _save(fig: Figure, out_path: str | Path, tight: bool = False) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Figure.savefig without pyplot: no global state, safe from the web server's worker thread.
    # A tight box costs a second draw, so only figures whose shape follows the data ask for it.
    fig.savefig(out_path, dpi=_DPI, bbox_inches="tight" if tight else None, pad_inches=0.15)
    return out_path

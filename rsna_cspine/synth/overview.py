"""Overview picture of a phantom: mid-sagittal and coronal reformats and axial slices at key levels.

Used to look at what the generator makes (``benchmarks/synth_overview.py`` writes one per field-of-view
kind). Reformats are drawn at their physical aspect ratio, vertebra labels tinted over the bone window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsna_cspine.synth.phantom import Phantom

#: Bone-friendly display window (HU): the one stage 1 sees (``seg.config.SegDataConfig.hu_window``).
WINDOW = (-400.0, 1600.0)
#: Axial levels shown: name → (vertebra label, mm relative to its top (negative = above)).
LEVELS: dict[str, tuple[int, float]] = {"skull base": (1, -20.0), "C2": (2, 8.0), "C5": (5, 6.0), "T1": (8, 8.0)}


def axial_levels(phantom: Phantom) -> dict[str, int | None]:
    """Slice index of each ``LEVELS`` entry (None when that level is not in the scan); a ``slab``
    shows four slices spread through it instead."""
    nz = phantom.hu.shape[0]
    if phantom.fov == "slab":
        return {f"slice {z}": int(z) for z in np.linspace(0, nz - 1, 4).round().astype(int)}
    dz = phantom.spacing[0]
    out: dict[str, int | None] = {}
    for name, (label, offset) in LEVELS.items():
        rows = np.nonzero((phantom.labels == label).any(axis=(1, 2)))[0]
        if not len(rows) or (label == 1 and rows[0] == 0):
            out[name] = None
            continue
        z = int(round(rows[0] + offset / dz))
        out[name] = min(max(z, 0), nz - 1) if label == 1 else (z if 0 <= z < nz else None)
    return out


def overview_figure(phantom: Phantom, path: str | Path, title: str = "", dpi: int = 60) -> Path:
    """Write the overview PNG of ``phantom`` to ``path``.

    Args:
        phantom: the study.
        path: output PNG.
        title: figure title (the study's window kind and spacing are appended).
        dpi: resolution (keeps the file small).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    hu = np.clip(phantom.hu.astype(np.float32), *WINDOW)
    labels = phantom.labels
    dz, dy, dx = phantom.spacing
    bone = np.argwhere(labels > 0)
    cy, cx = (bone[:, 1:].mean(axis=0).round().astype(int) if len(bone)
              else (hu.shape[1] // 2, hu.shape[2] // 2))
    levels = axial_levels(phantom)
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1.6, 1.0])
    tint = plt.get_cmap("tab20")
    for k, (name, image, lab, extent) in enumerate((
            ("mid-sagittal", hu[:, :, cx], labels[:, :, cx], (0, hu.shape[1] * dy, hu.shape[0] * dz, 0)),
            ("coronal", hu[:, cy, :], labels[:, cy, :], (0, hu.shape[2] * dx, hu.shape[0] * dz, 0)))):
        ax = fig.add_subplot(grid[0, 2 * k: 2 * k + 2])
        ax.imshow(image, cmap="gray", extent=extent, aspect="equal", interpolation="nearest")
        overlay = np.ma.masked_where(lab == 0, lab.astype(float))
        ax.imshow(overlay, cmap=tint, vmin=0, vmax=20, alpha=0.35, extent=extent, aspect="equal",
                  interpolation="nearest")
        for level, z in levels.items():
            if z is not None:
                ax.axhline((z + 0.5) * dz, color="yellow", lw=0.6, ls=":")
                ax.text(extent[1], (z + 0.5) * dz, f" {level}", color="yellow", fontsize=7, va="center")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mm")
        ax.set_ylabel("mm below the first slice")
    for k, (level, z) in enumerate(levels.items()):
        ax = fig.add_subplot(grid[1, k])
        ax.set_title(f"axial: {level}" + ("" if z is not None else " (not in scan)"), fontsize=9)
        ax.axis("off")
        if z is not None:
            ax.imshow(hu[z], cmap="gray", interpolation="nearest")
            ax.contour(labels[z] > 0, levels=[0.5], colors="orange", linewidths=0.6)
    fig.suptitle(f"{title}  window={phantom.fov}, {hu.shape[0]} slices × {dz:g} mm, "
                 f"{hu.shape[1]} px × {dy:.2f} mm, first slice {phantom.scan_top_mm:.0f} mm below the vertex",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

"""``seg_evidence.py real``: the QC verdicts of a trained stage-1 checkpoint on every real file of
``../shared/data/real`` and one overview picture per real series with the predicted labels
(``results/seg_real_*.png``). Run through ``seg_evidence.py`` (its options); see its docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd

from common import REPO_ROOT


def real_series(real_dir: Path, scratch: Path) -> list[tuple[str, Path | None, str]]:
    """``(name, folder, note)`` for every real file: each series folder as is, each single DICOM file as a
    one-slice series (a folder holding a link to it), other files with the reason they are not images."""
    out: list[tuple[str, Path | None, str]] = []
    for folder in sorted((real_dir / "rsna_partial").glob("1.2.826.*")):
        out.append((f"rsna_partial/{folder.name}", folder, "partial RSNA series (skull base or upper thorax)"))
    ts = real_dir / "totalsegmentator"
    if (ts / "example_ct_dicom").is_dir():
        out.append(("totalsegmentator/example_ct_dicom", ts / "example_ct_dicom", "abdominal CT, 20 slices"))
    for path in sorted(ts.glob("*.nii*")):
        out.append((f"totalsegmentator/{path.name}", None, "a label map, not an image"))
    for path in sorted((real_dir / "pydicom").glob("*.dcm")):
        folder = scratch / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
        out.append((f"pydicom/{path.name}", folder, "single slice"))
    return out


def draw_real_series(volume, raw, result, name: str, out_path: Path) -> Path:
    """Sagittal (through the labels or the middle) and axial views with the network's labels, the fine box
    and the QC's verdict; saved small (the figures go into the repository)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from rsna_cspine.report.pictures import display_flips, overlay_labels, window_to_unit

    labels = raw.mask
    shape = volume.shape
    found = np.nonzero(labels)
    if len(found[0]):
        z, y, x = (int(np.median(a)) for a in found)
    elif result.box is not None:
        z, y, x = (int(np.clip(a + n // 2, 0, s - 1)) for a, n, s in zip(result.box.start, result.box.size, shape))
    else:
        z, y, x = (s // 2 for s in shape)
    flip_rows, flip_cols = display_flips(volume)
    dz, dy, dx = volume.spacing
    fig = Figure(figsize=(10, 5.4))
    ax_sag, ax_ax = fig.subplots(1, 2)
    sag, sag_labels = volume.hu[:, :, x], labels[:, :, x]
    axial, ax_labels = volume.hu[z], labels[z]
    if flip_rows:
        sag, sag_labels, axial, ax_labels = sag[:, ::-1], sag_labels[:, ::-1], axial[::-1], ax_labels[::-1]
    if flip_cols:
        axial, ax_labels = axial[:, ::-1], ax_labels[:, ::-1]
    ax_sag.imshow(overlay_labels(window_to_unit(sag, (-400, 1500)), sag_labels, alpha=0.5), aspect=dz / dy,
                  interpolation="nearest")
    ax_ax.imshow(overlay_labels(window_to_unit(axial, (-400, 1500)), ax_labels, alpha=0.5), aspect=dy / dx,
                 interpolation="nearest")
    if result.box is not None:
        b0, b1 = result.box.start, result.box.size
        y0 = shape[1] - b0[1] - b1[1] if flip_rows else b0[1]
        x0 = shape[2] - b0[2] - b1[2] if flip_cols else b0[2]
        ax_sag.add_patch(Rectangle((y0 - 0.5, b0[0] - 0.5), b1[1], b1[0], fill=False, edgecolor="yellow", linestyle="--"))
        ax_ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), b1[2], b1[1], fill=False, edgecolor="yellow", linestyle="--"))
        ax_sag.set_xlim(-0.5, shape[1] - 0.5)
        ax_sag.set_ylim(shape[0] - 0.5, -0.5)
        ax_ax.set_xlim(-0.5, shape[2] - 0.5)
        ax_ax.set_ylim(shape[1] - 0.5, -0.5)
    ax_sag.set_title(f"sagittal, column {x} (anterior left, superior up)", fontsize=9)
    ax_ax.set_title(f"axial, slice {z} of {shape[0]} (R on left)", fontsize=9)
    for ax in (ax_sag, ax_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    found_names = ", ".join(v for v, f in zip(raw.vertebrae["vertebra"], raw.vertebrae["found"]) if f) or "none"
    fig.suptitle(f"{name}: {shape[0]}×{shape[1]}×{shape[2]} at {dz:.2f}×{dy:.2f}×{dx:.2f} mm", fontsize=11)
    neck = "no cervical spine found by the localiser" if result.neck is None and result.box is None else \
        "fine box (dashed)" if result.neck is not None else "whole volume"
    fig.text(0.5, 0.02, textwrap.fill(f"labelled by the network: {found_names}; {neck}. QC: {result.qc}", 140),
             ha="center", va="bottom", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.14, wspace=0.05)
    fig.savefig(out_path, dpi=70)
    return out_path


def real(args: argparse.Namespace) -> int:
    import copy

    import torch

    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.seg import load_segmenter

    torch.set_num_threads(args.threads)
    if not args.checkpoint:
        raise SystemExit("real: --checkpoint (a trained stage-1 best.pt) is required")
    real_dir = Path(args.real_dir)
    if not real_dir.is_dir():
        raise SystemExit(f"real files not found: {real_dir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    segmenter = load_segmenter(args.checkpoint, "cpu")
    rows, series = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, folder, note in real_series(real_dir, Path(scratch)):
            row = {"file": name, "note": note, "slices": None, "kept": "", "qc": "", "neck_found": None, "seconds": None}
            if folder is None:
                row["qc"] = "not run: " + note
                rows.append(row)
                continue
            try:
                volume = load_series(folder)
            except Exception as exc:  # noqa: BLE001 - a real file the loader refuses is a verdict too
                row["qc"] = f"not loaded: {exc.__class__.__name__}: {exc}"[:200]
                rows.append(row)
                continue
            t0 = time.perf_counter()
            raw = segmenter.segment(volume)
            result = segmenter.check(copy.deepcopy(raw), volume)
            row.update({"slices": volume.shape[0], "seconds": round(time.perf_counter() - t0, 2), "qc": result.qc,
                        "kept": ",".join(v for v, q in zip(result.vertebrae["vertebra"], result.vertebrae["qc"]) if q == "ok"),
                        "neck_found": result.neck is not None or segmenter.localiser is None,
                        "network_labelled": ",".join(v for v, f in zip(raw.vertebrae["vertebra"], raw.vertebrae["found"]) if f)})
            rows.append(row)
            if volume.shape[0] > 1:  # a one-slice file has no sagittal view worth a picture
                stem = name.split("/")[0] + "_" + (folder.name.rsplit(".", 1)[-1] if "rsna" in name else "ct")
                picture = draw_real_series(volume, raw, result, name, out / f"seg_real_{stem}.png").resolve()
                series[name] = str(picture.relative_to(REPO_ROOT) if picture.is_relative_to(REPO_ROOT) else picture)
    table = pd.DataFrame(rows)
    table.to_csv(out / "seg_real_qc.csv", index=False)
    report = {"checkpoint": str(args.checkpoint), "files": len(rows),
              "series_with_a_kept_vertebra": int((table["kept"].fillna("") != "").sum()),
              "most_kept_in_one_file": int(table["kept"].fillna("").map(lambda k: len(k.split(",")) if k else 0).max()),
              "pictures": series, "loadavg": [round(v, 2) for v in os.getloadavg()],
              "date": time.strftime("%Y-%m-%d")}
    print(table.to_string(index=False))
    print(json.dumps(report, indent=2))
    (out / "seg_real_qc.json").write_text(json.dumps(report, indent=1))
    return 0

"""Stage-1 output at the original resolution: grid labels → ``(z, y, x)`` mask, and the per-vertebra table.

Memory stays small for large studies: the network runs on the grid (128³ by default). With
``predict.upsample = nearest`` only the uint8 grid labels are mapped back to ``(z, y, x)`` by index
lookup. With ``linear`` the class probabilities are interpolated, but only inside the boxes around grid
cells whose neighbourhood holds more than one label, a few slices at a time; every other voxel copies
its grid label, which is exactly what the interpolation's argmax would give there. The 8-channel
probabilities are never upsampled whole (a 512×512×700 study would need 5.6 GB for them). The vertebra
table (extent, centroid, voxel count) follows from the mask's per-axis label histograms, which are
computed on the grid wherever the mask is a plain expansion of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rsna_cspine.constants import CERVICAL_LABELS, VERTEBRAE
from rsna_cspine.seg.boxes import VoxelBox, nearest_indices

#: Columns of the per-vertebra table (``z``/``y``/``x`` bounds are inclusive array indices).
VERTEBRA_COLUMNS: tuple[str, ...] = (
    "vertebra", "found", "z_min", "z_max", "slice_number_min", "slice_number_max",
    "y_min", "y_max", "x_min", "x_max", "centroid_z", "centroid_y", "centroid_x", "voxel_count",
)  # fmt: skip


#: Label values a mask can hold: background and C1..C7.
N_MASK_LABELS: int = len(CERVICAL_LABELS) + 1
UPSAMPLE_MODES: tuple[str, ...] = ("linear", "nearest")


def upsample_mask(grid_mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour expansion of a grid label map to ``shape`` (the inverse of the grid sampling).

    Args:
        grid_mask: ``(D, H, W)`` labels.
        shape: original ``(z, y, x)``.
    """
    idx = [nearest_indices(g, n) for g, n in zip(grid_mask.shape, shape)]
    return grid_mask[np.ix_(*idx)]


def _axis_coords(n: int, axis: int) -> np.ndarray:
    return np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])


def axis_histograms(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel count of every label 0..7 at every index along z, y and x: three ``(8, n_axis)`` arrays.

    Everything in the vertebra table (extent, centroid, count) follows from these projections, so they
    can be summed chunk by chunk over a large mask.

    Args:
        mask: ``(z, y, x)`` labels in 0..7.
    """
    mask = np.asarray(mask)
    out = [np.zeros((N_MASK_LABELS, n), dtype=np.int64) for n in mask.shape]
    # One boolean plane set per label and two small reductions: about half the time of a bincount over
    # int64 (label, index) keys, and no int64 copy of the mask.
    for label in range(1, N_MASK_LABELS):
        hit = mask == label
        per_zy = hit.sum(axis=2, dtype=np.int64)
        if not per_zy.any():
            continue
        out[0][label] = per_zy.sum(axis=1)
        out[1][label] = per_zy.sum(axis=0)
        out[2][label] = hit.sum(axis=1, dtype=np.int64).sum(axis=0)
    for axis, n in enumerate(mask.shape):
        out[axis][0] = mask.size // n - out[axis][1:].sum(axis=0)
    return out


def expanded_histograms(grid_labels: np.ndarray, indices: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``axis_histograms(grid_labels[np.ix_(*indices)])``, computed on the grid without the big array.

    A grid voxel expands to a box whose side along each axis is the number of output indices that
    read it, so the output count at index ``j`` of an axis is the grid count at its grid index weighted
    by the other two axes' multiplicities.

    Args:
        grid_labels: ``(D, H, W)`` labels in 0..7.
        indices: for each axis, the grid index read by every output index.
    """
    mult = [np.bincount(i, minlength=g).astype(np.float64) for i, g in zip(indices, grid_labels.shape)]
    labels = grid_labels.astype(np.int64)
    out = []
    for axis, g in enumerate(grid_labels.shape):
        weight = np.ones(grid_labels.shape)
        for other in range(3):
            if other != axis:
                weight = weight * mult[other].reshape([-1 if a == other else 1 for a in range(3)])
        flat = (labels * g + _axis_coords(g, axis)).ravel()
        grid_hist = np.bincount(flat, weights=weight.ravel(), minlength=N_MASK_LABELS * g).reshape(N_MASK_LABELS, g)
        out.append(np.rint(grid_hist[:, indices[axis]]).astype(np.int64))
    return out


def nearest_histograms(grid_mask: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    """``axis_histograms(upsample_mask(grid_mask, shape))``, computed on the grid without the big mask.

    Args:
        grid_mask: ``(D, H, W)`` labels in 0..7.
        shape: original ``(z, y, x)``.
    """
    return expanded_histograms(grid_mask, [nearest_indices(g, n) for g, n in zip(grid_mask.shape, shape)])


def table_from_histograms(histograms: Sequence[np.ndarray], slice_numbers: np.ndarray | None = None) -> pd.DataFrame:
    """The per-vertebra table (``VERTEBRA_COLUMNS``) from a mask's axis histograms.

    Args:
        histograms: ``axis_histograms`` (or ``nearest_histograms``) of the mask.
        slice_numbers: file number of each slice (``Volume.slice_numbers``); min/max over the vertebra's
            slices are reported, since file numbers may run in either direction.
    """
    rows = []
    for label, name in zip(CERVICAL_LABELS, VERTEBRAE):
        count = int(histograms[0][label].sum())
        row: dict = {"vertebra": name, "found": count > 0}
        if count:
            for key, hist in zip("zyx", histograms):
                h = hist[label]
                present = np.nonzero(h)[0]
                row[f"{key}_min"], row[f"{key}_max"] = int(present[0]), int(present[-1])
                row[f"centroid_{key}"] = float((np.arange(len(h)) * h).sum() / count)
            row["voxel_count"] = count
            if slice_numbers is not None and len(slice_numbers) == len(histograms[0][label]):
                numbers = np.asarray(slice_numbers)[row["z_min"] : row["z_max"] + 1]
                row["slice_number_min"], row["slice_number_max"] = int(numbers.min()), int(numbers.max())
        rows.append(row)
    return with_vertebra_dtypes(pd.DataFrame(rows).reindex(columns=list(VERTEBRA_COLUMNS)))


def with_vertebra_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with the vertebra table's types: nullable integer bounds and counts, float centroids, bool found.

    Args:
        table: holds every ``VERTEBRA_COLUMNS`` column (others, e.g. StudyInstanceUID, are kept as they are).
    """
    table = table.copy()
    for col in VERTEBRA_COLUMNS:
        if col.endswith(("_min", "_max")) or col == "voxel_count":
            table[col] = table[col].astype("Int64")
        elif col.startswith("centroid_"):
            table[col] = table[col].astype(float)
    table["found"] = table["found"].astype(bool)
    return table


def vertebra_table(
    grid_mask: np.ndarray, shape: Sequence[int], slice_numbers: np.ndarray | None = None
) -> pd.DataFrame:
    """Per-vertebra table of ``upsample_mask(grid_mask, shape)``, exactly, without building that mask.

    Args:
        grid_mask: ``(D, H, W)`` labels (1..7 = C1..C7).
        shape: original ``(z, y, x)``.
        slice_numbers: file number of each original slice.
    """
    return table_from_histograms(nearest_histograms(grid_mask, shape), slice_numbers)


def mask_table(mask: np.ndarray, slice_numbers: np.ndarray | None = None) -> pd.DataFrame:
    """Per-vertebra table of any ``(z, y, x)`` mask with labels 0..7 (e.g. a ground-truth one).

    Args:
        mask: labels (values above 7 are not allowed; fold thoracic labels first).
        slice_numbers: file number of each slice.
    """
    return table_from_histograms(axis_histograms(mask), slice_numbers)


def neck_length_mm(table: pd.DataFrame, n_slices: int, slice_mm: float) -> float:
    """The neck's length as C1's centre to C7's centre along z, in mm, from a vertebra table (:func:`mask_table`,
    or stage 1's own).

    The one measure of a neck for the true labels (training) and the network's (prediction), so a box is
    scaled alike in both. Centres rather than C1's top and C7's bottom: a few stray voxels of C7 on T1
    moved the extremes of a network's labels by 10-20 mm, its centres hardly. 0 (not measured) unless all
    seven vertebrae are labelled and none touches the scan's first or last slice: a neck the scan cuts
    is shorter than the patient's.

    Args:
        table: one row per vertebra with ``found``, ``z_min``, ``z_max``, ``centroid_z`` (slice indices).
        n_slices: the study's number of slices.
        slice_mm: its slice spacing.
    """
    if len(table) < len(CERVICAL_LABELS) or not bool(table["found"].all()):
        return 0.0
    if int(table["z_min"].min()) <= 0 or int(table["z_max"].max()) >= n_slices - 1:
        return 0.0
    centres = table.set_index("vertebra")["centroid_z"]
    return float(abs(centres[VERTEBRAE[-1]] - centres[VERTEBRAE[0]]) * slice_mm)


def linear_source(n_source: int, n_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source index and the upper one's weight for every target index.

    The rule of ``F.interpolate(..., mode="linear", align_corners=False)``: target ``j`` reads source
    position ``(j + 0.5) * n_source / n_target - 0.5``, clamped to the axis.

    Args:
        n_source: length of the grid axis.
        n_target: length of the original axis.
    """
    src = np.clip((np.arange(n_target) + 0.5) * n_source / n_target - 0.5, 0, n_source - 1)
    lower = np.floor(src).astype(np.int64)
    return lower, np.minimum(lower + 1, n_source - 1), src - lower


def mixed_cells(labels: np.ndarray) -> np.ndarray:
    """True for every grid cell (voxel ``i`` and its upper neighbours, ``2×2×2``) whose labels differ.

    A linearly interpolated value is a convex combination of its cell's corners; when every corner's
    argmax is the same class, that class wins the combination too. Only mixed cells need interpolating.

    Args:
        labels: ``(D, H, W)`` argmax of the class probabilities on the grid.
    """
    padded = np.pad(labels, [(0, 1)] * 3, mode="edge")  # the last voxel's "upper neighbour" is itself
    d, h, w = labels.shape
    mixed = np.zeros(labels.shape, dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    mixed |= padded[dz : dz + d, dy : dy + h, dx : dx + w] != labels
    return mixed


def _interpolate_labels(
    probs: torch.Tensor,
    z: tuple[np.ndarray, np.ndarray, np.ndarray],
    cells: tuple[int, int, int, int],
    shape: tuple[int, int],
    box: tuple[int, int, int, int],
) -> torch.Tensor:
    """Argmax of the trilinear interpolation inside an in-plane box of a few original slices.

    Args:
        probs: ``(C, D, H, W)`` grid probabilities.
        z: lower/upper grid slice and upper weight of each original slice of the chunk.
        cells: ``(b0, b1, c0, c1)`` inclusive range of grid rows/columns the box reads from.
        shape: original in-plane ``(Y, X)``.
        box: ``(y0, y1, x0, x1)`` end-exclusive original pixels wanted.

    Returns:
        int64 ``(n, y1 - y0, x1 - x0)`` class indices on ``probs.device``.
    """
    lower, upper, frac = z
    _, _, height, width = probs.shape
    (b0, b1, c0, c1), (y0, y1, x0, x1) = cells, box
    fy, fx = shape[0] / height, shape[1] / width
    if fy.is_integer() and fx.is_integer():
        # With an integer factor, grid row r starts exactly at original row r·f: interpolating a crop
        # (one grid cell of context each side) with that factor reads the same samples with the same
        # weights as the whole plane would, at a fraction of the cost.
        r0, r1, q0, q1 = max(b0 - 1, 0), min(b1 + 2, height), max(c0 - 1, 0), min(c1 + 2, width)
        resize = {"scale_factor": (fy, fx)}
    else:
        r0, r1, q0, q1 = 0, height, 0, width
        resize = {"size": tuple(shape)}
    oy, ox = int(r0 * fy), int(q0 * fx)
    w = torch.as_tensor(frac, dtype=probs.dtype, device=probs.device).view(1, -1, 1, 1)
    crop = probs[:, :, r0:r1, q0:q1]
    planes = (crop[:, lower] * (1 - w) + crop[:, upper] * w).transpose(0, 1)  # (n, C, h, w)
    out = torch.empty((len(lower), y1 - y0, x1 - x0), dtype=torch.int64, device=probs.device)
    for i in range(len(lower)):  # one slice at a time: its C full-size planes stay in cache
        full = F.interpolate(planes[i : i + 1], mode="bilinear", align_corners=False, **resize)[0]
        # max(dim).indices, not argmax: over the channel axis it is ~10× faster on CPU (same first-max rule).
        out[i] = full[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].max(dim=0).indices
    return out


def upsample_linear(
    probs: torch.Tensor, shape: Sequence[int], chunk_slices: int = 8
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Argmax of the trilinearly interpolated class probabilities at ``shape``, a few slices at a time.

    Equal to ``F.interpolate(probs, shape, mode="trilinear").argmax`` (up to float rounding at exact
    ties), but only where it can differ from the grid labels: a voxel whose grid cell is not mixed
    (:func:`mixed_cells`) takes its cell's label by index lookup, and per chunk of ``chunk_slices``
    slices only the in-plane box around the mixed cells is interpolated (z by hand, then in-plane).
    With a trained network that box hugs the spine; untrained noise makes it the whole plane.
    The mask's axis histograms are gathered on the way (on the grid for the looked-up part).

    Args:
        probs: ``(C, D, H, W)`` class probabilities on the grid (any device).
        shape: original ``(z, y, x)``.
        chunk_slices: slices interpolated at a time (bounds memory).

    Returns:
        uint8 mask ``(z, y, x)`` (labels above 7 set to 0) and its ``axis_histograms``.
    """
    n_z, n_y, n_x = (int(s) for s in shape)
    grid = probs.max(dim=0).indices.to(torch.uint8).cpu().numpy()
    mixed = mixed_cells(grid)
    grid[grid > max(CERVICAL_LABELS)] = 0  # the optional thoracic class is not part of the mask
    lz, uz, wz = linear_source(grid.shape[0], n_z)
    ly, lx = linear_source(grid.shape[1], n_y)[0], linear_source(grid.shape[2], n_x)[0]
    mask = np.empty((n_z, n_y, n_x), dtype=np.uint8)
    histograms = expanded_histograms(grid, (lz, ly, lx))
    for start in range(0, n_z, chunk_slices):
        stop = min(start + chunk_slices, n_z)
        cells_z = slice(lz[start], lz[stop - 1] + 1)
        block = np.take(np.take(grid[lz[start:stop]], ly, axis=1), lx, axis=2)
        footprint = mixed[cells_z].any(axis=0)
        if footprint.any():
            rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
            b0, b1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
            y0, y1 = int(np.searchsorted(ly, b0, "left")), int(np.searchsorted(ly, b1, "right"))
            x0, x1 = int(np.searchsorted(lx, c0, "left")), int(np.searchsorted(lx, c1, "right"))
        # An output coarser in-plane than the grid (pixels larger than the grid's mm) may read none of the
        # footprint's rows or columns: nothing to interpolate, the lookup is the answer.
        if footprint.any() and y0 < y1 and x0 < x1:
            z = (lz[start:stop], uz[start:stop], wz[start:stop])
            labels = _interpolate_labels(probs, z, (b0, b1, c0, c1), (n_y, n_x), (y0, y1, x0, x1))
            labels[labels > max(CERVICAL_LABELS)] = 0
            dense = labels.to(torch.uint8).cpu().numpy()
            # Swap the looked-up box's counts (computed on the grid) for the interpolated box's.
            looked_up = expanded_histograms(
                grid[cells_z, b0 : b1 + 1, c0 : c1 + 1], (lz[start:stop] - lz[start], ly[y0:y1] - b0, lx[x0:x1] - c0)
            )
            for axis, (span, old, new) in enumerate(
                zip(((start, stop), (y0, y1), (x0, x1)), looked_up, axis_histograms(dense))
            ):
                histograms[axis][:, span[0] : span[1]] += new - old
            block[:, y0:y1, x0:x1] = dense
        mask[start:stop] = block
    return mask, histograms


def place_box(
    box_mask: np.ndarray, histograms: Sequence[np.ndarray], box: VoxelBox, shape: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A box's mask and axis histograms placed in a volume of ``shape`` (0 outside the box).

    The cascade's fine pass labels only its box; every other voxel of the study is background. Labels
    that fall outside the volume (the box may reach beyond the scan) are dropped.

    Args:
        box_mask: uint8 ``box.size`` labels.
        histograms: ``axis_histograms(box_mask)`` (e.g. from :func:`upsample_linear`).
        box: where the box lies, in the volume's voxels.
        shape: the volume's ``(z, y, x)``.

    Returns:
        uint8 ``shape`` mask and its ``axis_histograms``.
    """
    shape = tuple(int(n) for n in shape)
    mask = np.zeros(shape, dtype=np.uint8)
    parts = box.overlap(shape)
    out = [np.zeros((N_MASK_LABELS, n), dtype=np.int64) for n in shape]
    if parts is None:
        for axis, n in enumerate(shape):
            out[axis][0] = mask.size // n
        return mask, out
    inside, in_box = parts
    mask[inside] = box_mask[in_box]
    # Inside the volume the box's own histograms only need shifting; a box reaching beyond it is counted again.
    placed = list(histograms) if box.inside(shape) else axis_histograms(mask[inside])
    for axis, n in enumerate(shape):
        lo, hi = inside[axis].start, inside[axis].stop
        source = placed[axis] if not box.inside(shape) else placed[axis][:, in_box[axis]]
        out[axis][1:, lo:hi] = source[1:]
        out[axis][0] = mask.size // n - out[axis][1:].sum(axis=0)
    return mask, out

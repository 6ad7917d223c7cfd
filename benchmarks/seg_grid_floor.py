"""The resolution floor of stage-1 grids: how much Dice the round trip truth → grid → original loses alone.

No network: each study's true label map is sampled onto the grid (nearest neighbour, the rule of the
training cache) and expanded back to every original slice (the rule of ``predict.upsample: nearest``),
then scored against itself with ``seg.evaluate_segmentation``. The whole-volume grid resamples the whole
study; a cascade grid covers ``grid × spacing`` mm centred on the labelled cervical spine (a perfect
localiser). A trained network cannot beat its grid's floor by much::

    .venv/bin/python benchmarks/seg_grid_floor.py --data work/seg_ev_real/heldout_data --studies 12
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

#: ``(grid, mm per voxel or None for the whole volume)`` compared by default.
DEFAULT_GRIDS: tuple[tuple[tuple[int, int, int], tuple[float, float, float] | None], ...] = (
    ((64, 128, 128), None),
    ((64, 128, 128), (3.0, 1.2, 1.2)),
    ((64, 128, 128), (3.0, 1.0, 1.0)),
    ((64, 128, 128), (2.5, 1.2, 1.2)),
    ((64, 160, 160), (3.0, 1.0, 1.0)),
    ((80, 128, 128), (2.4, 1.2, 1.2)),
)


def round_trip(truth: np.ndarray, spacing_mm, grid, spacing) -> np.ndarray:
    """``truth`` sampled onto the grid and expanded back to its own shape."""
    from rsna_cspine.seg.boxes import VoxelBox, box_size, label_centre, sample_labels
    from rsna_cspine.seg.masks import axis_histograms, place_box, upsample_mask
    from rsna_cspine.seg.preprocess import resample_nearest

    if spacing is None:
        return upsample_mask(resample_nearest(truth, grid), truth.shape)
    box = VoxelBox.centred(label_centre(truth, range(1, 8)), box_size(spacing_mm, grid, spacing))
    expanded = upsample_mask(sample_labels(truth, box, grid), box.size)
    return place_box(expanded, axis_histograms(expanded), box, truth.shape)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a fully segmented Kaggle-layout folder (train split)")
    parser.add_argument("--studies", type=int, default=12, help="the first N studies of train.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from rsna_cspine.io.dicom import load_series
    from rsna_cspine.io.kaggle import KaggleLayout, read_train_labels
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.seg import evaluate_segmentation
    from rsna_cspine.seg.boxes import label_centre
    from rsna_cspine.seg.preprocess import fold_labels

    layout = KaggleLayout(Path(args.data))
    studies = []
    for uid in read_train_labels(layout.train_csv)["StudyInstanceUID"].astype(str)[: args.studies]:
        volume = load_series(layout.study_dir(uid, "train"))
        truth = fold_labels(load_segmentation(layout.segmentation_path(uid), volume))
        if label_centre(truth, range(1, 8)) is not None:  # a slab without a cervical vertebra has no floor
            studies.append((truth, volume.spacing))
    rows = []
    for grid, spacing in DEFAULT_GRIDS:
        scores = [evaluate_segmentation(round_trip(truth, mm, grid, spacing), truth) for truth, mm in studies]
        within = [e <= 2 for s in scores for e in s["z_error"].values() if np.isfinite(e)]
        rows.append({"grid": list(grid), "spacing_mm": list(spacing) if spacing else "whole volume",
                     "dice_floor": round(float(np.mean([s["dice_mean"] for s in scores])), 4),
                     "share_within_2_slices": round(float(np.mean(within)), 4), "studies": len(studies)})
        print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1's cascade: boxes in millimetres, the localiser, the fine pass mapped back to every slice, training.

The networks in the geometry tests are stand-ins whose answer is known (class by intensity band), so
the mapping from the localiser's coarse grid to the fine box and back to the original slices can be
checked voxel by voxel; the training test optimises real networks on toy caches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.config import config_from_checkpoint, to_dict
from rsna_cspine.engine import save_checkpoint
from rsna_cspine.errors import ConfigError, CSpineError
from rsna_cspine.seg.boxes import (
    SIZE_BAND,
    CascadeGeometry,
    VoxelBox,
    coarse_shape,
    label_centre,
    read_box,
    sample_labels,
    size_scale,
)
from rsna_cspine.seg.config import (
    SegAugmentConfig,
    SegConfig,
    SegDataConfig,
    SegLocaliserConfig,
    SegModelConfig,
    SegPredictConfig,
    SegTrainConfig,
)
from rsna_cspine.seg.evaluate import evaluate_segmentation
from rsna_cspine.seg.localise import Localiser, localiser_config
from rsna_cspine.seg.masks import axis_histograms, mask_table, neck_length_mm, place_box, table_from_histograms
from rsna_cspine.seg.model import build_model
from rsna_cspine.seg.predict import Segmenter, load_segmenter
from rsna_cspine.seg.preprocess import preprocess_volume, resample_nearest, write_cache_file
from rsna_cspine.training.config import OptimConfig
from tests.paths import REAL_DATA
from tests.toy_seg import IntensityBands, toy_labels
from tests.toy_volume import axial_volume

WINDOW = (-400.0, 1600.0)


class Bright(torch.nn.Module):
    """A stand-in localiser: "cervical spine" wherever the windowed intensity exceeds 0.05."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 0.05) * 1000], dim=1)


# ------------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------------


def test_a_box_reads_the_volume_with_air_outside_it() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(9, 7, 8)).astype(np.float32)
    padded = np.pad(array, 5, constant_values=-7.0)
    for start, size in [((-3, 2, -1), (6, 9, 4)), ((1, 1, 1), (4, 4, 4)), ((20, 0, 0), (3, 3, 3))]:
        box = VoxelBox(start, size)
        expected = padded[tuple(slice(a + 5, a + 5 + n) for a, n in zip(start, size))] if start[0] < 10 else \
            np.full(size, -7.0, np.float32)
        np.testing.assert_array_equal(read_box(array, box, -7.0), expected)
        np.testing.assert_array_equal(read_box(array, box, -7.0, (1, 3)), expected[1:3])
    assert VoxelBox.centred((4.0, 3.0, 3.5), (5, 4, 4)) == VoxelBox((2, 2, 2), (5, 4, 4))
    assert VoxelBox((1, 1, 1), (4, 4, 4)).inside((9, 7, 8)) and not VoxelBox((-1, 1, 1), (4, 4, 4)).inside((9, 7, 8))


def test_labels_and_image_of_a_box_equal_those_of_the_padded_volume() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, size=(20, 16, 18)).astype(np.uint8)
    hu = rng.normal(300, 500, size=(20, 16, 18)).astype(np.float32)
    box = VoxelBox((-4, 3, -2), (24, 10, 25))
    pad = [(max(-a, 0), max(a + n - s, 0)) for a, n, s in zip(box.start, box.size, labels.shape)]
    start = [a + p[0] for a, p in zip(box.start, pad)]
    region = tuple(slice(a, a + n) for a, n in zip(start, box.size))
    padded_labels = np.pad(labels, pad)[region]
    np.testing.assert_array_equal(sample_labels(labels, box, (12, 5, 10)), resample_nearest(padded_labels, (12, 5, 10)))
    padded_hu = np.pad(hu, pad, constant_values=WINDOW[0])[region]
    whole = preprocess_volume(axial_volume(padded_hu), (12, 5, 10), WINDOW, chunk_slices=7)
    boxed = preprocess_volume(axial_volume(hu), (12, 5, 10), WINDOW, chunk_slices=5, box=box)
    np.testing.assert_allclose(boxed, whole, atol=1e-6)
    assert label_centre(np.pad(labels == 3, 2).astype(np.uint8), [1]) == pytest.approx(
        tuple((2 + 2 + n - 1) / 2 for n in labels.shape)
    )


@pytest.mark.parametrize("start", [(2, 3, 1), (-3, -2, 4), (30, 0, 0)], ids=["inside", "beyond", "outside"])
def test_a_box_mask_is_placed_in_the_volume_with_exact_histograms(start) -> None:
    rng = np.random.default_rng(2)
    box = VoxelBox(start, (9, 8, 7))
    box_mask = rng.integers(0, 8, size=box.size).astype(np.uint8)
    mask, histograms = place_box(box_mask, axis_histograms(box_mask), box, (14, 12, 13))
    expected = np.zeros((14, 12, 13), np.uint8)
    for z, y, x in np.ndindex(*box.size):
        p = (z + start[0], y + start[1], x + start[2])
        if all(0 <= c < n for c, n in zip(p, expected.shape)):
            expected[p] = box_mask[z, y, x]
    np.testing.assert_array_equal(mask, expected)
    for got, want in zip(histograms, axis_histograms(expected)):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------
# The cascade at prediction
# ------------------------------------------------------------------------------------------------


def spine_volume(offset: tuple[int, int, int] = (0, 0, 0), shape=(200, 128, 128)) -> tuple:
    """A 400-mm scan (2-mm voxels) with seven stacked "vertebrae" (HU band k) far from its centre."""
    hu = np.full(shape, -400.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    z0, y0, x0 = 70 + offset[0], 80 + offset[1], 40 + offset[2]
    for k in range(1, 8):
        box = (slice(z0 + 9 * (k - 1), z0 + 9 * k - 1), slice(y0 - 8, y0 + 8), slice(x0 - 8, x0 + 8))
        hu[box], labels[box] = 200.0 * k - 400.0, k
    volume = axial_volume(hu, study_uid="1.2.3.test")
    volume.spacing = (2.0, 2.0, 2.0)
    return volume, labels


def band_cascade(upsample: str = "nearest") -> Segmenter:
    fine = SegConfig(data=SegDataConfig(grid=(48, 32, 32), spacing=(4.0, 4.0, 4.0), hu_window=WINDOW, antialias=False),
                     localiser=SegLocaliserConfig(enabled=True), predict=SegPredictConfig(upsample=upsample))
    loc_cfg = localiser_config(fine)
    loc_cfg.data.spacing, loc_cfg.data.grid = (8.0, 8.0, 8.0), (16, 16, 16)
    localiser = Localiser([Bright()], loc_cfg, torch.device("cpu"))
    return Segmenter([IntensityBands()], fine, torch.device("cpu"), localiser=localiser)


@pytest.mark.parametrize("upsample", ["nearest", "linear"])
def test_the_fine_box_is_centred_on_the_neck_and_the_mask_maps_back_to_every_slice(upsample) -> None:
    volume, truth = spine_volume()
    segmenter = band_cascade(upsample)
    result = segmenter.segment(volume)
    # The box: 48 × 4 mm = 192 mm = 96 voxels of 2 mm, centred on the column (z 70..132, y 72..87, x 32..47).
    assert result.box.size == (96, 64, 64)
    centre = [a + (n - 1) / 2 for a, n in zip(result.box.start, result.box.size)]
    # To within a coarse voxel (4 voxels) and a half: interpolation blurs the faint top (C1) and bright bottom.
    assert centre == pytest.approx([(70 + 132) / 2, (72 + 87) / 2, (32 + 47) / 2], abs=6.0)
    assert result.neck is not None and result.neck.extent_mm[0] == pytest.approx(63 * 2, abs=8)
    assert result.mask.shape == volume.shape
    scores = evaluate_segmentation(result.mask, truth)
    assert scores["dice_mean"] > 0.9 and all(e <= 2 for e in scores["z_error"].values())
    outside = np.ones(volume.shape, bool)
    outside[tuple(slice(max(a, 0), a + n) for a, n in zip(result.box.start, result.box.size))] = False
    assert not result.mask[outside].any()
    table = table_from_histograms(axis_histograms(result.mask), volume.slice_numbers)
    pd.testing.assert_frame_equal(result.vertebrae, table)
    checked = segmenter.predict(volume)
    assert checked.vertebrae["qc"].notna().all()


def test_a_neck_at_the_edge_of_the_scan_is_padded_not_squashed() -> None:
    volume, truth = spine_volume(offset=(-60, 40, -30))  # vertebrae from slice 10, near the corner
    result = band_cascade().segment(volume)
    assert result.box.start[0] < 0 and not result.box.inside(volume.shape)
    assert evaluate_segmentation(result.mask, truth)["dice_mean"] > 0.9


def test_the_fine_box_follows_the_neck_length_when_a_reference_is_set() -> None:
    """With ``data.reference_neck_mm`` the labels come from a box centred on a first (sizing) pass's labels and
    scaled by their length over the reference: a neck 1.1 times the reference gets a box 1.1 times as
    large; a ratio outside SIZE_BAND keeps the configured size; the labels still map back to every slice."""
    volume, truth = spine_volume()  # C1 to C7 centres: slices 73.5 to 127.5 × 2 mm = 108 mm
    plain = band_cascade().segment(volume)
    for ratio, factor in ((1.1, 1.1), (0.8, 0.8), (3.0, 1.0)):
        segmenter = band_cascade()
        segmenter.cfg.data.reference_neck_mm = 108.0 / ratio
        result = segmenter.segment(volume)
        # To 5 %: the toy network's faint C1 blurs into air on coarser grids, so its neck measures a little short.
        assert [n / p for n, p in zip(result.box.size, plain.box.size)] == pytest.approx([factor] * 3, abs=0.05)
        if factor != 1.0:  # refined: centred on the labelled neck (z 70..131, y 72..87, x 32..47)
            centre = [a + (n - 1) / 2 for a, n in zip(result.box.start, result.box.size)]
            assert centre == pytest.approx([100.5, 79.5, 39.5], abs=1.5)
        # The toy network reads intensity bands, which a grid coarser than 4 mm blurs across its 16-mm
        # vertebrae; on the finer grids it labels about as well as with the plain box (Dice 0.92).
        if ratio <= 1.0 or factor == 1.0:
            assert evaluate_segmentation(result.mask, truth)["dice_mean"] > 0.85


def test_the_first_pass_sizes_the_box_on_its_nearest_labels_and_the_labels_come_from_the_configured_pass() -> None:
    """With ``data.reference_neck_mm`` the first pass's table is read from its nearest-neighbour labels (no
    linear upsampling of a grid that only sizes the box): the box is the one its linear labels give to within
    a voxel, and what ``segment`` returns is the configured (linear) pass over that box."""
    volume, _ = spine_volume()
    segmenter = band_cascade("linear")
    segmenter.cfg.data.reference_neck_mm = 108.0 / 1.1
    box, _ = segmenter.locate(volume)
    grid_mask, probs = segmenter.grid_labels(volume, box)
    by_nearest = segmenter.refine_box(segmenter.map_back(grid_mask, probs.clone(), box, volume, "nearest"), volume)
    by_linear = segmenter.refine_box(segmenter.map_back(grid_mask, probs, box, volume), volume)
    assert by_nearest is not None and by_linear is not None and by_nearest != box
    assert all(abs(a - b) <= 1 for a, b in zip(by_nearest.start + by_nearest.size, by_linear.start + by_linear.size))
    result = segmenter.segment(volume)
    assert result.box == by_nearest
    np.testing.assert_array_equal(result.mask, segmenter.segment_box(volume, by_nearest).mask)
    # Without a reference the one pass is returned as configured.
    segmenter.cfg.data.reference_neck_mm = 0.0
    plain_box, _ = segmenter.locate(volume)
    np.testing.assert_array_equal(segmenter.segment(volume).mask, segmenter.segment_box(volume, plain_box).mask)


def test_no_second_box_is_fitted_to_a_first_pass_whose_c1_is_painted_over_the_skull() -> None:
    volume, _ = spine_volume()
    segmenter = band_cascade()
    segmenter.cfg.data.reference_neck_mm = 108.0 / 1.1
    box, _ = segmenter.locate(volume)
    first = segmenter.segment_box(volume, box)
    assert segmenter.refine_box(first, volume) is not None  # a plausible first pass is refined
    skull = first.mask[30:70, 72:88, 32:48]  # C1 run up 80 mm above the neck, as on a real skull base
    skull[skull == 0] = 1
    first.vertebrae = mask_table(first.mask)
    assert neck_length_mm(first.vertebrae, volume.shape[0], 2.0) > 0  # it would still measure a "neck"
    assert segmenter.refine_box(first, volume) is None


def test_size_scale_is_the_neck_length_over_the_reference_inside_its_band() -> None:
    assert size_scale(100.0, 0.0) == 1.0  # off
    assert size_scale(112.0, 140.0) == pytest.approx(0.8)
    assert size_scale(175.0, 140.0) == pytest.approx(1.25)
    low, high = SIZE_BAND
    assert size_scale(140.0 * low * 0.95, 140.0) == 1.0 and size_scale(140.0 * high * 1.05, 140.0) == 1.0
    assert size_scale(0.0, 140.0) == 1.0  # nothing found


def test_the_neck_is_measured_only_when_all_seven_are_labelled_inside_the_scan() -> None:
    _, labels = spine_volume()  # C1..C7 on slices 70..131 of 200
    assert neck_length_mm(mask_table(labels), 200, 2.0) == pytest.approx((127.5 - 73.5) * 2.0)  # C1 to C7 centres
    missing = labels.copy()
    missing[missing == 7] = 0
    assert neck_length_mm(mask_table(missing), 200, 2.0) == 0.0
    assert neck_length_mm(mask_table(labels[70:]), 130, 2.0) == 0.0  # the scan begins inside C1


def test_no_cervical_spine_found_means_an_empty_mask_and_every_vertebra_absent() -> None:
    volume = axial_volume(np.full((40, 64, 64), -400.0, np.float32), study_uid="1.2.3.test")
    result = band_cascade().predict(volume)
    assert result.box is None and result.neck is None and not result.mask.any()
    assert result.mask.shape == volume.shape
    assert result.vertebrae["qc"].tolist() == ["absent"] * 7
    assert result.qc == "kept none; absent C1,C2,C3,C4,C5,C6,C7"


def test_a_cascade_config_needs_its_localiser() -> None:
    cfg = SegConfig(data=SegDataConfig(grid=(16, 16, 16), spacing=(3.0, 1.2, 1.2)),
                    localiser=SegLocaliserConfig(enabled=True))
    with pytest.raises(ConfigError, match="localiser"):
        Segmenter([IntensityBands()], cfg, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# Training and checkpoints
# ------------------------------------------------------------------------------------------------

GRID, MARGIN, COARSE = (16, 32, 32), (2, 4, 4), (16, 16, 16)


def toy_cascade_cache(folder: Path, n: int, seed: int) -> list[Path]:
    """Toy studies in the cascade's cache format: a fine box larger than the grid and a whole coarse study."""
    rng = np.random.default_rng(seed)
    stored = tuple(g + 2 * m for g, m in zip(GRID, MARGIN))
    paths = []
    for i in range(n):
        fine = toy_labels(rng, stored)
        coarse = np.zeros(COARSE, np.uint8)
        z0, y0, x0 = rng.integers(1, 5), rng.integers(2, 9), rng.integers(2, 9)
        coarse[z0:z0 + 10, y0:y0 + 5, x0:x0 + 5] = rng.integers(1, 8)  # the cervical spine, coarsely
        coarse[z0 + 10:z0 + 12, y0:y0 + 5, x0:x0 + 5] = 8  # T1: not cervical
        noisy = lambda lab: (0.1 + 0.4 * (lab > 0) + rng.normal(0, 0.05, lab.shape)).astype(np.float32)[None]  # noqa: E731
        paths.append(write_cache_file(
            folder / f"toy{i}.npz", noisy(fine), fine, (64, 64, 64), (1.0, 1.0, 1.0),
            loc_image=noisy(coarse).astype(np.float16), loc_labels=coarse, box=np.array([[0, 0, 0], list(stored)]),
        ))
    return paths


def cascade_config(run_dir: Path, epochs: int) -> SegConfig:
    return SegConfig(
        run_dir=str(run_dir), device="cpu", seed=3,
        data=SegDataConfig(grid=GRID, spacing=(3.0, 1.2, 1.2), box_margin_mm=(6.0, 4.8, 4.8)),
        model=SegModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0),
        aug=SegAugmentConfig(enabled=False),
        train=SegTrainConfig(epochs=epochs, batch_size=2, patience=0),
        optim=OptimConfig(lr=5e-3, weight_decay=1e-5, warmup_epochs=0),
        localiser=SegLocaliserConfig(enabled=True, grid=COARSE, epochs=epochs,
                                     model=SegModelConfig(channels=(4, 8), strides=(2,), num_res_units=0)),
    )


def test_the_cascade_trains_both_networks_and_one_checkpoint_carries_them(tmp_path) -> None:
    from rsna_cspine.seg.train import fit_segmentation

    torch.set_num_threads(1)
    paths = toy_cascade_cache(tmp_path / "cache", 6, seed=0)
    run = fit_segmentation(cascade_config(tmp_path / "run", epochs=10), paths[:4], paths[4:], progress=False)
    for folder in (run, run / "localiser"):
        summary = pd.read_csv(folder / "summary.csv")
        assert summary["train_loss"].iloc[-1] < 0.8 * summary["train_loss"].iloc[0], folder
        assert summary["val_loss"].iloc[-1] < summary["val_loss"].iloc[0], folder
    assert "val_dice_cervical" in pd.read_csv(run / "localiser" / "summary.csv")
    best = torch.load(run / "best.pt", weights_only=False)
    stored = best["extra"]["localiser"]
    assert config_from_checkpoint(SegConfig, stored["config"]).data.grid == COARSE
    segmenter = load_segmenter(run / "best.pt", "cpu")
    assert segmenter.localiser is not None
    loc_weights = torch.load(run / "localiser" / "best.pt", weights_only=False)["model"]
    for key, value in segmenter.localiser.models[0].state_dict().items():
        torch.testing.assert_close(value, loc_weights[key])
    volume = axial_volume(np.random.default_rng(0).normal(0, 300, (30, 40, 40)), study_uid="1.2.3.test")
    result = segmenter.predict(volume)
    assert result.mask.shape == (30, 40, 40) and "qc" in result.vertebrae

    # Resumed after the fine network started, the localiser is kept as it was, not trained again.
    before = (run / "localiser" / "last.pt").stat().st_mtime_ns
    fit_segmentation(cascade_config(tmp_path / "run", epochs=11), paths[:4], paths[4:], resume=True, progress=False)
    assert (run / "localiser" / "last.pt").stat().st_mtime_ns == before
    assert pd.read_csv(run / "summary.csv")["epoch"].max() == 11


def test_an_old_whole_volume_checkpoint_predicts_as_before_and_a_cascade_one_without_localiser_is_refused(tmp_path) -> None:
    old = {"data": {"grid": [16, 16, 16]}, "model": {"channels": [4, 8], "strides": [2]}}  # written before the cascade
    cfg = config_from_checkpoint(SegConfig, old)
    assert not cfg.data.cascade and not cfg.localiser.enabled
    save_checkpoint(tmp_path / "old.pt", model=build_model(cfg.model, 8), epoch=1, config=old)
    volume = axial_volume(np.random.default_rng(1).normal(0, 300, (21, 30, 30)), study_uid="1.2.3.test")
    segmenter = load_segmenter(tmp_path / "old.pt", "cpu")
    assert segmenter.localiser is None
    assert segmenter.segment(volume).box == VoxelBox.whole(volume.shape)
    cascade = cascade_config(tmp_path / "c", 1)
    save_checkpoint(tmp_path / "c.pt", model=build_model(cascade.model, 8), epoch=1, config=to_dict(cascade))
    with pytest.raises(CSpineError, match="no localiser"):
        load_segmenter(tmp_path / "c.pt", "cpu")


def test_the_training_cache_holds_the_box_around_the_labelled_neck_and_the_whole_coarse_study(tmp_path) -> None:
    from rsna_cspine.io.study import load_study
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.prepare import PrepareConfig, Stage1InputConfig, prepare_dataset
    from rsna_cspine.seg.preprocess import build_cache, cache_fingerprint, load_cached_study, write_stage1_input
    from rsna_cspine.synth import SynthConfig, write_dataset
    from rsna_cspine.training.prepared import PreparedCache

    root = tmp_path / "data"
    write_dataset(root, SynthConfig(n_studies=2, seed=5, image_size=48, test_fraction=0.0, fov_head_fraction=1.0,
                                    fov_slab_fraction=0.0), progress=False)
    layout = KaggleLayout(root)
    uids = sorted(p.name for p in (root / "train_images").iterdir())
    geometry = CascadeGeometry((4.0, 2.0, 2.0), (20.0, 10.0, 10.0), (8.0, 6.0, 6.0))
    files = build_cache(layout, uids, tmp_path / "cache", (48, 64, 64), progress=False, cascade=geometry)
    assert cache_fingerprint((48, 64, 64), WINDOW, True, geometry) != cache_fingerprint((48, 64, 64), WINDOW, True)
    for uid in uids:
        volume = load_study(layout.study_path(uid, "train"))
        labels = load_segmentation(layout.segmentation_path(uid), volume)
        with np.load(files[uid]) as npz:
            assert npz["image"].shape == (1, 48 + 10, 64 + 10, 64 + 10) and npz["labels"].shape == (58, 74, 74)
            assert set(np.unique(npz["labels"])) >= set(range(1, 8))  # the whole cervical spine is in the box
            assert npz["loc_image"].shape[1:] == coarse_shape(volume.shape, volume.spacing, (8.0, 6.0, 6.0))
            assert set(np.unique(npz["loc_labels"])) >= set(range(1, 8))
            start, size = npz["box"]
        # The labels' box middle is the box's middle (to a voxel), in the study's voxels.
        centre = label_centre(labels, range(1, 8))
        assert [a + (n - 1) / 2 for a, n in zip(start, size)] == pytest.approx(centre, abs=1.0)
        # A head-to-chest study is squashed in no direction: z and in-plane keep their mm.
        assert size[0] * volume.spacing[0] == pytest.approx(58 * 4.0, abs=volume.spacing[0])
        assert size[1] * volume.spacing[1] == pytest.approx(74 * 2.0, abs=volume.spacing[1])

    # `rsna-cspine prepare` writes the same stage-1 input through the same per-study step.
    stage1 = Stage1InputConfig((48, 64, 64), WINDOW, True, (4.0, 2.0, 2.0), (20.0, 10.0, 10.0), (8.0, 6.0, 6.0))
    prepare_dataset(root, tmp_path / "prepared", PrepareConfig(stage1=stage1, mask_source="gt", workers=1),
                    progress=False)
    for uid in uids:
        with np.load(files[uid]) as built, np.load(PreparedCache(tmp_path / "prepared").seg_path(uid)) as prepared:
            assert sorted(built.files) == sorted(prepared.files)
            for key in built.files:
                np.testing.assert_array_equal(prepared[key], built[key], err_msg=key)

    # A study without a segmentation gets both inputs but no labels, so it cannot train either network.
    written, image = write_stage1_input(tmp_path / "unlabelled.npz", volume, None, (48, 64, 64), WINDOW,
                                        cascade=geometry)
    assert image is None  # nothing a segmenter could reuse: its own localiser places the fine box
    with np.load(written) as npz:
        assert {"image", "loc_image", "box"} <= set(npz.files) and not {"labels", "loc_labels"} & set(npz.files)
    for localiser in (False, True):
        with pytest.raises(CSpineError, match="unlabelled.npz"):
            load_cached_study(written, localiser=localiser)


def test_with_a_reference_neck_a_small_and_a_large_patient_fill_the_training_grid_alike(tmp_path) -> None:
    """The cached fine box is scaled to the labelled neck's length: a patient 0.75 times the usual size
    and one 1.2 times it span nearly the same number of grid slices, where a box of one size in mm gives the
    small neck about 0.6 of the large one's; the factor is recorded as ``size_scale``."""
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.io.nifti import load_segmentation
    from rsna_cspine.io.study import load_study
    from rsna_cspine.seg.preprocess import write_stage1_input
    from rsna_cspine.synth import SynthConfig, write_dataset

    spans: dict[tuple[str, float], int] = {}
    for size in (0.75, 1.2):
        root = tmp_path / f"data{size}"
        write_dataset(root, SynthConfig(n_studies=1, seed=3, image_size=48, test_fraction=0.0, fov_head_fraction=0.0,
                                        fov_slab_fraction=0.0, anatomy_scale=(size, size)), progress=False)
        layout = KaggleLayout(root)
        uid = next((root / "train_images").iterdir()).name
        volume = load_study(layout.study_path(uid, "train"))
        labels = load_segmentation(layout.segmentation_path(uid), volume)
        for reference in (0.0, 115.0):
            geometry = CascadeGeometry((4.0, 2.0, 2.0), (0.0, 0.0, 0.0), (8.0, 6.0, 6.0), reference)
            written, _ = write_stage1_input(tmp_path / f"{size}_{reference}.npz", volume, labels, (64, 64, 64), WINDOW,
                                            cascade=geometry)
            with np.load(written) as npz:
                present = np.flatnonzero(np.isin(npz["labels"], range(1, 8)).any(axis=(1, 2)))
                spans[("scaled" if reference else "fixed", size)] = int(present[-1] - present[0] + 1)
                assert (float(npz["size_scale"]) != 1.0) == bool(reference)
    assert spans[("fixed", 0.75)] / spans[("fixed", 1.2)] < 0.7
    assert spans[("scaled", 0.75)] / spans[("scaled", 1.2)] == pytest.approx(1.0, abs=0.12)


def test_a_cache_prepared_for_one_reference_neck_is_refused_by_a_config_with_another(tmp_path) -> None:
    from rsna_cspine.prepare import PrepareConfig, Stage1InputConfig, prepare_dataset
    from rsna_cspine.synth import SynthConfig, write_dataset
    from rsna_cspine.training.caches import prepared_seg_studies

    root = tmp_path / "data"
    write_dataset(root, SynthConfig(n_studies=1, seed=3, image_size=48, test_fraction=0.0, fov_slab_fraction=0.0),
                  progress=False)
    uid = next((root / "train_images").iterdir()).name
    stage1 = Stage1InputConfig((48, 64, 64), WINDOW, True, (4.0, 2.0, 2.0), (20.0, 10.0, 10.0), (8.0, 6.0, 6.0), 115.0)
    prepare_dataset(root, tmp_path / "cache", PrepareConfig(stage1=stage1, mask_source="gt", workers=1), progress=False)
    geometry = CascadeGeometry((4.0, 2.0, 2.0), (20.0, 10.0, 10.0), (8.0, 6.0, 6.0), 115.0)
    assert list(prepared_seg_studies(tmp_path / "cache", [uid], (48, 64, 64), WINDOW, True, "cmd",
                                     cascade=geometry.settings())) == [uid]
    for other in (0.0, 130.0):
        changed = CascadeGeometry((4.0, 2.0, 2.0), (20.0, 10.0, 10.0), (8.0, 6.0, 6.0), other)
        with pytest.raises(ConfigError, match="reference_neck_mm: cache 115.0"):
            prepared_seg_studies(tmp_path / "cache", [uid], (48, 64, 64), WINDOW, True, "cmd", cascade=changed.settings())


def test_a_cascade_segmenter_never_takes_a_whole_volume_image() -> None:
    """prepare hands its stage-1 image to the models only when it is their input: never to a cascade model,
    even when its grid, window and antialias match (its localiser decides where the fine box goes)."""
    cascade = band_cascade()
    d = cascade.cfg.data
    assert not cascade.accepts(d.grid, d.hu_window, d.antialias)
    whole = SegConfig(data=SegDataConfig(grid=d.grid, hu_window=d.hu_window, antialias=d.antialias))
    assert Segmenter([IntensityBands()], whole, torch.device("cpu")).accepts(d.grid, d.hu_window, d.antialias)
    volume, _ = spine_volume()
    with pytest.raises(ValueError, match="not this segmenter's input"):
        cascade.predict(volume, preprocess_volume(volume, d.grid, d.hu_window, antialias=d.antialias))


def test_the_fine_training_crop_is_a_localiser_miss_drawn_uniformly_over_the_margin(tmp_path) -> None:
    """Training takes the grid from the stored fine box at an offset drawn uniformly per axis (a localiser
    that missed by up to the margin), not wherever a label voxel pulls it: a crop centred on a label
    voxel clamps most offsets to the margin's ends, which a centred box at prediction never shows."""
    from rsna_cspine.seg.config import SegAugmentConfig
    from rsna_cspine.seg.data import build_transforms

    grid, margin = (8, 16, 16), 4
    stored = (grid[0] + 2 * margin, grid[1] + 2 * margin, grid[2] + 2 * margin)
    image = np.broadcast_to(np.arange(stored[0], dtype=np.float32)[:, None, None] / 100, stored)[None]
    labels = np.zeros(stored, np.uint8)
    labels[2:14, 10:14, 10:14] = 3  # a neck filling most of the box's height, as in the cache
    path = write_cache_file(tmp_path / "fine.npz", image, labels, stored, (3.0, 1.2, 1.2))
    transform = build_transforms(SegAugmentConfig(enabled=False), grid, "background", train=True,
                                 patch_size=(0, 8, 8), patch_foreground=0.8, source="fine")
    transform.set_random_state(seed=0)
    offsets = []
    for _ in range(450):
        item = transform({"path": str(path)})
        item = item[0] if isinstance(item, list) else item  # the patch crop returns its samples as a list
        assert tuple(item["image"].shape) == (1, 8, 8, 8) and tuple(item["label"].shape) == (1, 8, 8, 8)
        offsets.append(int(round(float(item["image"][0, 0, 0, 0]) * 100)))
    counts = np.bincount(offsets, minlength=2 * margin + 1)
    assert len(counts) == 2 * margin + 1 and (counts > 0).all()  # every miss up to the margin, both ways
    share = counts / counts.sum()
    assert share.max() < 1 / (2 * margin + 1) + 0.06  # about uniform: no offset (an end) dominates


# ------------------------------------------------------------------------------------------------
# Real files
# ------------------------------------------------------------------------------------------------

REAL_SERIES = [REAL_DATA / "totalsegmentator" / "example_ct_dicom",
               *sorted((REAL_DATA / "rsna_partial").glob("1.2.826.*"))] if REAL_DATA.is_dir() else []


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real test files not available")
@pytest.mark.parametrize("folder", REAL_SERIES, ids=lambda p: p.name[-12:])
def test_the_cascade_runs_on_real_series_and_claims_at_most_one_vertebra(folder) -> None:
    from rsna_cspine.io.study import load_study

    volume = load_study(folder)
    segmenter = band_cascade("linear")  # every bone voxel looks like a vertebra to it: a worst case
    result = segmenter.predict(volume)
    assert result.mask.shape == volume.shape
    kept = result.vertebrae["qc"] == "ok"
    assert kept.sum() <= 1, result.qc
    assert not np.isin(result.mask, [i + 1 for i in np.flatnonzero(~kept.to_numpy())]).any()


"""Stage-1 prediction: grid → original resolution, per-vertebra table, clean-up, checkpoints, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rsna_cspine.engine import save_checkpoint
from rsna_cspine.io.volume import Volume
from rsna_cspine.seg.config import SegConfig, SegDataConfig, SegModelConfig, SegPredictConfig
from rsna_cspine.seg.evaluate import evaluate_segmentation
from rsna_cspine.seg.model import build_model
from rsna_cspine.seg.masks import (
    VERTEBRA_COLUMNS,
    mask_table,
    table_from_histograms,
    upsample_linear,
    upsample_mask,
    vertebra_table,
)
from rsna_cspine.seg.predict import Segmenter, load_segmenter
from tests.toy_seg import IntensityBands
from tests.toy_volume import axial_volume

WINDOW = (-400.0, 1600.0)


def band_volume(shape: tuple[int, int, int], boxes: dict[int, tuple[slice, slice, slice]]) -> tuple[Volume, np.ndarray]:
    """HU = 200 k − 400 inside box k (windowed value k / 10), −400 elsewhere; returns (volume, labels)."""
    hu = np.full(shape, -400.0)
    labels = np.zeros(shape, np.uint8)
    for k, box in boxes.items():
        hu[box] = 200.0 * k - 400.0
        labels[box] = k
    return axial_volume(hu, study_uid="1.2.3.test"), labels


def band_segmenter(grid: tuple[int, int, int], upsample: str = "nearest") -> Segmenter:
    cfg = SegConfig(
        data=SegDataConfig(grid=grid, hu_window=WINDOW, antialias=False),
        predict=SegPredictConfig(upsample=upsample, chunk_slices=5),
    )
    return Segmenter([IntensityBands()], cfg, torch.device("cpu"))


def volume_with_stray_blob() -> tuple[Volume, np.ndarray, tuple[slice, slice, slice]]:
    """Boxes for every vertebra but C5 on even indices, plus a small C3-valued blob far from C3.

    A 2× linear shrink of it averages exact 2×2×2 blocks, so the grid image is exact.
    """
    even = lambda a, b: slice(2 * a, 2 * b)  # noqa: E731
    boxes = {k: (even(3 * k - 2, 3 * k), even(4, 10), even(5, 11)) for k in (1, 2, 3, 4, 6, 7)}
    volume, truth = band_volume((48, 32, 32), boxes)
    stray = (slice(40, 44), slice(24, 28), slice(24, 28))
    volume.hu[stray] = 200.0 * 3 - 400.0
    return volume, truth, stray


def test_segment_returns_the_mask_at_original_resolution_with_a_cleaned_table() -> None:
    # Nearest expansion of an exact grid mask must reproduce the truth voxel for voxel.
    volume, truth, _ = volume_with_stray_blob()
    result = band_segmenter((24, 16, 16)).segment(volume)  # the network's labels, before the QC
    assert result.mask.shape == volume.shape and result.mask.dtype == np.uint8
    assert result.grid_mask.shape == (24, 16, 16)
    np.testing.assert_array_equal(result.mask, truth)  # the stray blob is gone, nothing else changed
    table = result.vertebrae
    assert list(table.columns) == list(VERTEBRA_COLUMNS)
    assert table["vertebra"].tolist() == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert table["found"].tolist() == [True, True, True, True, False, True, True]
    c5 = table.set_index("vertebra").loc["C5"]
    assert c5[["z_min", "z_max", "voxel_count"]].isna().all()
    c2 = table.set_index("vertebra").loc["C2"]
    assert (c2["z_min"], c2["z_max"]) == (8, 11)
    assert (c2["slice_number_min"], c2["slice_number_max"]) == (9, 12)  # file numbers 1-based
    assert (c2["y_min"], c2["y_max"], c2["x_min"], c2["x_max"]) == (8, 19, 10, 21)
    assert c2["voxel_count"] == 4 * 12 * 12
    assert c2["centroid_z"] == pytest.approx(9.5)


def test_predict_handles_shapes_that_are_not_multiples_of_the_grid() -> None:
    # Stacked full-plane slabs of 10 slices each (z 5..74), shrunk 75 → 16 slices on the grid.
    boxes = {k: (slice(10 * k - 5, 10 * k + 5), slice(None), slice(None)) for k in range(1, 8)}
    volume, truth = band_volume((75, 37, 41), boxes)
    volume.slice_numbers = np.arange(75, 0, -1)  # reversed file numbering: z = 0 is file 75
    result = band_segmenter((16, 16, 16), upsample="linear").segment(volume)
    assert result.mask.shape == (75, 37, 41)
    table = result.vertebrae.set_index("vertebra")
    assert table["found"].all()
    step = 75 / 16  # one grid slice in original slices: the boundary can move by at most that
    for k in range(1, 8):
        row = table.loc[f"C{k}"]
        assert abs(row["z_min"] - (10 * k - 5)) <= step and abs(row["z_max"] - (10 * k + 4)) <= step
        assert row["slice_number_min"] == 75 - row["z_max"] and row["slice_number_max"] == 75 - row["z_min"]
    assert evaluate_segmentation(result.mask, truth)["dice_mean"] > 0.8


@pytest.mark.parametrize("grid_shape, shape", [((6, 5, 7), (20, 11, 9)), ((10, 8, 8), (7, 5, 13))])
def test_vertebra_table_equals_brute_force_on_the_expanded_mask(grid_shape, shape) -> None:
    rng = np.random.default_rng(sum(shape))
    grid_mask = rng.integers(0, 8, size=grid_shape).astype(np.uint8)
    grid_mask[grid_mask == 4] = 0  # one vertebra absent
    full = upsample_mask(grid_mask, shape)
    assert full.shape == shape
    table = vertebra_table(grid_mask, shape, np.arange(100, 100 + shape[0])).set_index("vertebra")
    for k in range(1, 8):
        row = table.loc[f"C{k}"]
        coords = np.nonzero(full == k)
        assert row["found"] == bool(len(coords[0]))
        if not row["found"]:
            continue
        assert row["voxel_count"] == len(coords[0])
        for axis, key in enumerate("zyx"):
            assert row[f"{key}_min"] == coords[axis].min() and row[f"{key}_max"] == coords[axis].max()
            assert row[f"centroid_{key}"] == pytest.approx(coords[axis].mean())
        assert row["slice_number_min"] == 100 + coords[0].min()


def test_linear_upsampling_equals_a_full_trilinear_interpolation() -> None:
    rng = np.random.default_rng(5)
    probs = torch.softmax(torch.as_tensor(rng.normal(0, 2, (8, 6, 5, 7)), dtype=torch.float32), dim=0)
    shape = (23, 12, 9)
    expected = F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)[0].argmax(0).numpy()
    mask, histograms = upsample_linear(probs, shape, chunk_slices=4)
    np.testing.assert_array_equal(mask, expected)
    reference = mask_table(mask, np.arange(1, 24))
    pd.testing.assert_frame_equal(table_from_histograms(histograms, np.arange(1, 24)), reference)
    assert reference.set_index("vertebra").loc["C2", "voxel_count"] == (mask == 2).sum()


def test_linear_mode_also_drops_the_stray_blob() -> None:
    volume, truth, stray = volume_with_stray_blob()
    result = band_segmenter((24, 16, 16), upsample="linear").segment(volume)
    assert result.mask.shape == volume.shape
    assert not (result.mask[stray] == 3).any()
    assert evaluate_segmentation(result.mask, truth)["dice_mean"] > 0.85
    assert result.vertebrae["found"].tolist() == [True, True, True, True, False, True, True]


def test_load_segmenter_rebuilds_a_trained_checkpoint(tmp_path) -> None:
    from rsna_cspine.config import to_dict

    cfg = SegConfig(data=SegDataConfig(grid=(16, 16, 16)), model=SegModelConfig(channels=(4, 8), strides=(2,)))
    torch.manual_seed(0)
    model = build_model(cfg.model, 8)
    save_checkpoint(tmp_path / "best.pt", model=model, epoch=1, config=to_dict(cfg))
    segmenter = load_segmenter([tmp_path / "best.pt", tmp_path / "best.pt"], "cpu")
    assert len(segmenter.models) == 2 and segmenter.grid == (16, 16, 16)
    for a, b in zip(segmenter.models[0].state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)
    volume = axial_volume(np.random.default_rng(0).normal(0, 300, (21, 30, 30)))
    result = segmenter.predict(volume)
    assert result.mask.shape == (21, 30, 30) and result.mask.max() <= 7


def test_load_segmenter_names_a_missing_checkpoint(tmp_path) -> None:
    from rsna_cspine.errors import CSpineError

    with pytest.raises(CSpineError, match="nope.pt"):
        load_segmenter(tmp_path / "nope.pt", "cpu")


def test_evaluate_segmentation_dice_and_slice_error_by_hand() -> None:
    truth = np.zeros((30, 8, 8), np.uint8)
    truth[0:10, 2:6, 2:6] = 1  # C1: 10 slices
    truth[10:20, 2:6, 2:6] = 2  # C2
    truth[20:30, 2:6, 2:6] = 9  # a thoracic vertebra: ignored
    pred = np.zeros_like(truth)
    pred[1:11, 2:6, 2:6] = 1  # C1 shifted down one slice: overlap 9 of 10 slices
    pred[25:28, 2:6, 2:6] = 3  # C3 predicted where the truth has none
    scores = evaluate_segmentation(pred, truth)
    assert scores["dice"]["C1"] == pytest.approx(2 * 9 / 20)
    assert scores["dice"]["C2"] == 0.0
    assert scores["dice"]["C3"] == 0.0 and math.isnan(scores["z_error"]["C3"])
    assert math.isnan(scores["dice"]["C4"])
    assert scores["z_error"]["C1"] == 1.0 and scores["z_error"]["C2"] == math.inf
    assert scores["found"] == {"C1": 1.0, "C2": 0.0}
    assert scores["dice_mean"] == pytest.approx((0.9 + 0.0) / 2)


def test_dice_through_monai_equals_the_confusion_matrix_formula_on_real_labels(real_ct: Volume, real_data) -> None:
    """MONAI DiceMetric against ``2·TP / (|pred| + |true|)`` from the joint label histogram (the formula it
    replaced), on the TotalSegmentator example's real vertebra labels and a damaged copy of them: shifted
    two slices, C5 dropped, C6 relabelled C3 (present in the prediction only), thoracic labels kept."""
    import warnings

    from rsna_cspine.io.nifti import load_segmentation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the example's organ labels above 19 are dropped with a warning
        truth = load_segmentation(real_data / "totalsegmentator" / "example_seg_dicom.nii.gz", real_ct)
    pred = np.roll(truth, 2, axis=0)
    pred[pred == 5] = 0
    pred[pred == 6] = 3
    assert {1, 5, 6, 7} <= set(np.unique(truth)) and (truth > 7).any()  # C1, C5-C7 and thoracic in view
    n = 8
    cervical = lambda m: np.where(m <= 7, m, 0).astype(np.int64)  # noqa: E731
    confusion = np.bincount((cervical(truth) * n + cervical(pred)).ravel(), minlength=n * n).reshape(n, n)
    scores = evaluate_segmentation(pred, truth)
    for label, name in enumerate(["C1", "C2", "C3", "C4", "C5", "C6", "C7"], start=1):
        total = confusion[label, :].sum() + confusion[:, label].sum()
        expected = 2.0 * confusion[label, label] / total if total else math.nan
        if math.isnan(expected):
            assert math.isnan(scores["dice"][name]), name
        else:
            assert scores["dice"][name] == pytest.approx(expected, rel=1e-6, abs=1e-7), name  # MONAI: float32
    assert scores["dice"]["C3"] == 0.0 and scores["dice"]["C5"] == 0.0 and 0.0 < scores["dice"]["C1"] < 1.0


def test_mirroring_makes_the_labels_follow_a_left_right_flip_of_the_input() -> None:
    # A randomly initialised UNet is not mirror-symmetric: its softmax on a flipped input is not the flipped
    # softmax. Averaged with the mirrored pass it must be (up to float rounding), and equal to that average.
    torch.manual_seed(0)
    model_cfg = SegModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    cfg = lambda mirror: SegConfig(  # noqa: E731
        data=SegDataConfig(grid=(8, 16, 16), hu_window=WINDOW, antialias=False),
        predict=SegPredictConfig(mirror=mirror))
    model = build_model(model_cfg, out_channels=8).eval()
    image = np.random.default_rng(0).random((1, 8, 16, 16), dtype=np.float32)
    flipped = image[..., ::-1].copy()
    plain, mirrored = (Segmenter([model], cfg(m), torch.device("cpu"), amp=False) for m in (False, True))
    assert (plain.predict_probabilities(flipped) - plain.predict_probabilities(image).flip(-1)).abs().max() > 1e-3
    both = mirrored.predict_probabilities(image)
    torch.testing.assert_close(mirrored.predict_probabilities(flipped), both.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(both, (plain.predict_probabilities(image)
                                      + plain.predict_probabilities(flipped).flip(-1)) / 2, atol=1e-6, rtol=0)
    assert torch.allclose(both.sum(0), torch.ones(8, 16, 16), atol=1e-5)


def test_validation_and_prediction_run_the_network_in_the_same_windows_of_roi_size() -> None:
    # nnU-Net's rule: a network trained on patches predicts in windows of the patch, so its instance norms see
    # what they saw in training. The default (0 = the grid's size) is one window, as before the setting.
    from rsna_cspine.errors import ConfigError
    from rsna_cspine.seg.task import make_loss, validate

    torch.manual_seed(0)
    model = build_model(SegModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0), out_channels=8).eval()
    seen: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape[2:])))
    grid = (8, 16, 16)
    image = np.random.default_rng(0).random((1, *grid), dtype=np.float32)

    def segmenter(**predict) -> Segmenter:
        cfg = SegConfig(data=SegDataConfig(grid=grid, hu_window=WINDOW, antialias=False),
                        predict=SegPredictConfig(**predict))
        return Segmenter([model], cfg, torch.device("cpu"), amp=False)

    whole = segmenter().predict_probabilities(image)
    assert seen == [grid]
    seen.clear()
    windows = SegPredictConfig(roi_size=(0, 8, 8), overlap=0.5, blend="gaussian")
    windowed = segmenter(**vars(windows)).predict_probabilities(image)
    assert set(seen) == {(8, 8, 8)} and len(seen) == 9  # 3 × 3 half-overlapping windows in-plane
    assert (windowed - whole).abs().max() > 1e-3  # the instance norms' statistics differ per window
    assert torch.allclose(windowed.sum(0), torch.ones(grid), atol=1e-5)

    # Validation scores the windowed labels, not the whole grid's: against the windowed argmax as the truth its
    # Dice is 1 for every class present, and below 1 when it runs in one window over the grid.
    assert (windowed.argmax(0) != whole.argmax(0)).any()
    label = windowed.argmax(0)[None, None].float()
    batch = [{"image": torch.as_tensor(image)[None], "label": label}]
    loss = make_loss(SegConfig(data=SegDataConfig(grid=grid)))
    seen.clear()
    _, dice = validate(model, batch, loss, torch.device("cpu"), 8, amp=False, windows=windows, grid=grid, progress=False)
    assert set(seen) == {(8, 8, 8)} and len(seen) == 9
    present = np.isfinite(dice)
    assert present.sum() >= 2 and np.allclose(dice[present], 1.0)
    _, dice_whole = validate(model, batch, loss, torch.device("cpu"), 8, amp=False, windows=SegPredictConfig(), grid=grid,
                             progress=False)
    assert np.nanmean(dice_whole) < 0.99

    seen.clear()
    segmenter(roi_size=(0, 32, 8)).predict_probabilities(image)  # beyond the grid: the grid's size on that axis
    assert set(seen) == {(8, 16, 8)}
    for bad, match in (({"roi_size": (0, 8)}, "roi_size"), ({"blend": "median"}, "blend")):
        with pytest.raises(ConfigError, match=match):
            segmenter(**bad).predict_probabilities(image)


def test_the_localiser_predicts_in_the_windows_and_blend_its_validation_used() -> None:
    # The same rule for the cascade's localiser: validation (seg.task.validate) runs it through model.window_logits
    # with its predict section, and so must its prediction, or a scan longer than its grid is blended otherwise
    # than when its epoch was picked.
    import dataclasses

    from rsna_cspine.seg.boxes import coarse_shape
    from rsna_cspine.seg.config import SegLocaliserConfig
    from rsna_cspine.seg.localise import LOCALISER_CLASSES, Localiser, localiser_config
    from rsna_cspine.seg.model import window_logits
    from rsna_cspine.seg.preprocess import preprocess_volume

    torch.manual_seed(0)
    small = SegModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    fine = SegConfig(data=SegDataConfig(grid=(48, 32, 32), spacing=(4.0, 4.0, 4.0), hu_window=WINDOW, antialias=False),
                     localiser=SegLocaliserConfig(enabled=True, model=small),
                     predict=SegPredictConfig(overlap=0.5, blend="gaussian"))
    loc_cfg = localiser_config(fine)
    loc_cfg.data.spacing, loc_cfg.data.grid = (8.0, 8.0, 8.0), (16, 16, 16)
    model = build_model(loc_cfg.model, LOCALISER_CLASSES).eval()
    seen: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape[2:])))
    hu = np.random.default_rng(1).uniform(-400.0, 1200.0, size=(200, 64, 64)).astype(np.float32)
    volume = axial_volume(hu, study_uid="1.2.3.long")
    volume.spacing = (2.0, 2.0, 2.0)  # 400 mm: 50 coarse slices, so the 16-slice windows overlap along z
    probs = Localiser([model], loc_cfg, torch.device("cpu")).probabilities(volume)
    assert set(seen) == {(16, 16, 16)} and len(seen) > 4
    shape = coarse_shape(volume.shape, volume.spacing, loc_cfg.data.spacing)
    image = torch.as_tensor(preprocess_volume(volume, shape, WINDOW, antialias=False), dtype=torch.float32)[None]
    with torch.no_grad():
        validated = torch.softmax(window_logits(model, image, loc_cfg.predict, loc_cfg.data.grid), dim=1)[0, 1]
        flat = dataclasses.replace(loc_cfg.predict, blend="constant")
        constant = torch.softmax(window_logits(model, image, flat, loc_cfg.data.grid), dim=1)[0, 1]
    torch.testing.assert_close(probs, validated)
    assert (constant - validated).abs().max() > 1e-4  # the blend matters where windows overlap

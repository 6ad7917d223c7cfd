"""Per-vertebra 2.5D crops: geometry, neighbour channels, mask channel, absent vertebrae, cache files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from rsna_cspine.constants import VERTEBRAE
from rsna_cspine.crops import (
    CropConfig,
    box_maps_from_boxes,
    extract_vertebra_crops,
    load_crops,
    load_vertebra_stack,
    save_crops,
    slice_labels_from_boxes,
)
from rsna_cspine.errors import ConfigError

#: (label, z0, z1, y0, y1, x0, x1) inclusive-exclusive in y/x, inclusive in z.
BLOCKS = [
    (1, 2, 9, 20, 40, 25, 45),
    (2, 10, 24, 22, 46, 24, 44),
    (3, 25, 31, 24, 40, 26, 42),
    (5, 40, 47, 28, 44, 30, 50),
    (6, 48, 55, 30, 50, 30, 50),
    (7, 56, 63, 30, 52, 28, 52),
]
ABSENT = 4  # C4 is deliberately missing


def _z_ramp_volume(n_z: int = 70, size: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A volume whose every voxel on slice z equals z, and a mask of cuboid vertebrae (+ a T1 block)."""
    hu = np.broadcast_to(np.arange(n_z, dtype=np.float32)[:, None, None], (n_z, size, size)).copy()
    mask = np.zeros((n_z, size, size), dtype=np.uint8)
    for label, z0, z1, y0, y1, x0, x1 in BLOCKS:
        mask[z0 : z1 + 1, y0:y1, x0:x1] = label
    mask[64:70, 10:70, 10:70] = 8  # thoracic: must be ignored
    return hu, mask


# A window (0, 255) maps HU z → byte z exactly, so every pixel tells which slice it came from.
IDENTITY_WINDOW = ((0.0, 255.0),)


def test_shapes_presence_and_absent_vertebra() -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=6, channels=3, size=32, windows=IDENTITY_WINDOW + ((-100.0, 100.0),), add_mask_channel=True)
    crops = extract_vertebra_crops(hu, mask, cfg)
    assert cfg.in_chans == 3 * 2 + 1
    assert crops.images.shape == (7, 6, 7, 32, 32)
    assert crops.images.dtype == np.uint8
    assert crops.present.tolist() == [True, True, True, False, True, True, True]
    i = ABSENT - 1
    assert not crops.images[i].any()
    assert (crops.slice_index[i] == -1).all() and (crops.z_range[i] == -1).all() and (crops.boxes[i] == -1).all()
    assert (crops.slice_labels == -1).all()


def test_centre_slices_evenly_span_the_vertebra() -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=5, channels=1, size=24, windows=IDENTITY_WINDOW)
    crops = extract_vertebra_crops(hu, mask, cfg)
    for label, z0, z1, *_ in BLOCKS:
        idx = crops.slice_index[label - 1]
        assert idx[0] == z0 and idx[-1] == z1
        assert (np.diff(idx) >= 0).all()
        assert np.ptp(np.diff(idx)) <= 1  # even spacing up to rounding
        assert tuple(crops.z_range[label - 1]) == (z0, z1)
        # The image itself comes from that slice: every pixel equals its z.
        assert (crops.images[label - 1, :, 0] == idx[:, None, None]).all()


@pytest.mark.parametrize("step", [1, 2])
def test_neighbour_channels_are_the_right_slices(step: int) -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=4, channels=5, size=16, windows=IDENTITY_WINDOW, neighbour_step=step)
    crops = extract_vertebra_crops(hu, mask, cfg)
    n_z = hu.shape[0]
    for label, *_ in BLOCKS:
        for n, centre in enumerate(crops.slice_index[label - 1]):
            for c in range(5):
                expected = min(max(centre + (c - 2) * step, 0), n_z - 1)
                assert (crops.images[label - 1, n, c] == expected).all(), (label, n, c)


def test_crop_box_contains_vertebra_with_margin_and_is_square_in_mm() -> None:
    hu, mask = _z_ramp_volume()
    spacing = (1.0, 0.5, 0.8)
    cfg = CropConfig(n_slices=3, channels=1, size=16, margin=0.2)
    crops = extract_vertebra_crops(hu, mask, cfg, spacing=spacing)
    for label, _, _, y0, y1, x0, x1 in BLOCKS:
        by0, by1, bx0, bx1 = crops.boxes[label - 1]
        assert by0 <= y0 and by1 >= y1 and bx0 <= x0 and bx1 >= x1
        side_mm = max((y1 - y0) * spacing[1], (x1 - x0) * spacing[2]) * 1.4
        assert (by1 - by0) * spacing[1] == pytest.approx(side_mm, abs=spacing[1])
        assert (bx1 - bx0) * spacing[2] == pytest.approx(side_mm, abs=spacing[2])


def test_mm_margin_needs_spacing_and_widens_the_box() -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=3, channels=1, size=16, margin=5.0, margin_unit="mm")
    with pytest.raises(ConfigError):
        extract_vertebra_crops(hu, mask, cfg)
    crops = extract_vertebra_crops(hu, mask, cfg, spacing=(1.0, 1.0, 1.0))
    label, _, _, y0, y1, x0, x1 = BLOCKS[1]
    by0, by1, _, _ = crops.boxes[label - 1]
    assert by1 - by0 == max(y1 - y0, x1 - x0) + 10


def test_max_side_caps_wide_boxes_around_their_centre_and_leaves_small_ones() -> None:
    hu, mask = _z_ramp_volume()
    spacing = (1.0, 1.0, 1.0)
    free = extract_vertebra_crops(hu, mask, CropConfig(n_slices=3, channels=1, size=16, margin=0.2), spacing)
    capped = extract_vertebra_crops(
        hu, mask, CropConfig(n_slices=3, channels=1, size=16, margin=0.2, max_side_mm=26.0), spacing
    )
    for label, _, _, y0, y1, x0, x1 in BLOCKS:
        i = label - 1
        side = free.boxes[i, 1] - free.boxes[i, 0]
        if side <= 26:
            np.testing.assert_array_equal(capped.boxes[i], free.boxes[i])
        else:
            by0, by1, bx0, bx1 = capped.boxes[i]
            assert by1 - by0 == bx1 - bx0 == 26
            # Same centre as the uncapped box (within a pixel of rounding).
            assert abs((by0 + by1) - (y0 + y1)) <= 1 and abs((bx0 + bx1) - (x0 + x1)) <= 1
    assert (capped.boxes[:, 1] - capped.boxes[:, 0]).max() == 26 < (free.boxes[:, 1] - free.boxes[:, 0]).max()
    with pytest.raises(ConfigError):
        CropConfig(max_side_mm=-1.0).validate()


def test_a_cache_recorded_with_a_removed_setting_at_its_neutral_value_is_still_used(tmp_path) -> None:
    import yaml

    from rsna_cspine.crops.cache import LEGACY_SETTINGS_FILE, crop_cache_fingerprint, legacy_settings_match

    cfg = CropConfig(n_slices=3, channels=1, size=40)
    settings = crop_cache_fingerprint(cfg)
    assert legacy_settings_match(tmp_path, settings)  # no settings file of an older version: files are judged alone
    (tmp_path / LEGACY_SETTINGS_FILE).write_text(yaml.safe_dump({**settings, "isolate": False}))  # as caches wrote it
    assert legacy_settings_match(tmp_path, settings)  # the same crops: kept
    (tmp_path / LEGACY_SETTINGS_FILE).write_text(yaml.safe_dump({**settings, "isolate": True}))
    assert not legacy_settings_match(tmp_path, settings)  # crops cut differently: rebuilt
    (tmp_path / LEGACY_SETTINGS_FILE).write_text(yaml.safe_dump({**settings, "size": 48}))
    assert not legacy_settings_match(tmp_path, settings)


def test_mask_channel_covers_the_vertebra_share_of_the_crop() -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=4, channels=3, size=64, margin=0.25, add_mask_channel=True, dtype="float16")
    crops = extract_vertebra_crops(hu, mask, cfg)
    assert crops.images.dtype == np.float16
    for label, _, _, y0, y1, x0, x1 in BLOCKS:
        mask_plane = crops.images[label - 1, :, -1].astype(np.float32)
        side = max(y1 - y0, x1 - x0) * 1.5
        expected_share = (y1 - y0) * (x1 - x0) / side**2
        assert mask_plane.mean() == pytest.approx(expected_share, rel=0.12)
        centre = mask_plane[:, 32, 32]
        assert (centre > 0.99).all()  # the box centre lies inside the vertebra
        assert (mask_plane[:, 0, 0] < 0.01).all()  # the margin corner does not


def test_box_past_the_image_edge_is_padded_with_air() -> None:
    hu = np.full((10, 40, 40), 500.0, dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[2:8, 0:10, 0:10] = 1  # vertebra in the image corner
    cfg = CropConfig(n_slices=3, channels=1, size=20, margin=0.5, windows=((-400.0, 1500.0),))
    crops = extract_vertebra_crops(hu, mask, cfg)
    y0, _, x0, _ = crops.boxes[0]
    assert y0 < 0 and x0 < 0
    plane = crops.images[0, 0, 0]
    assert plane[0, 0] == 0  # padded air is below the window
    assert plane[-1, -1] == round((500 + 400) / 1900 * 255)


def test_even_channel_count_is_rejected() -> None:
    hu, mask = _z_ramp_volume()
    with pytest.raises(ConfigError):
        extract_vertebra_crops(hu, mask, CropConfig(channels=4))


def test_slice_labels_from_boxes() -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=8, channels=3, size=8, windows=IDENTITY_WINDOW)
    crops = extract_vertebra_crops(hu, mask, cfg)
    assert (slice_labels_from_boxes(crops, None, cfg.half_width) == -1).all()
    # Boxes on z=12 (inside C2, 10..24) and z=26 (inside C3, 25..31).
    labels = slice_labels_from_boxes(crops, np.array([12, 26]), cfg.half_width)
    c2, c3 = crops.slice_index[1], crops.slice_index[2]
    assert labels[1].tolist() == (np.abs(c2 - 12) <= 1).astype(int).tolist()
    assert labels[2].tolist() == (np.abs(c3 - 26) <= 1).astype(int).tolist()
    assert labels[1].sum() >= 1 and labels[2].sum() >= 1
    # z=26 is within ±1 of C2's last slice (24)? No: 2 away. And a C3 box never marks C2 or C1.
    assert labels[0].sum() == 0 and (labels[3] == -1).all() and labels[4:].sum() == 0
    # A box outside the vertebra's own z-range never counts, even when it is near a centre slice.
    edge = slice_labels_from_boxes(crops, np.array([25]), cfg.half_width)
    assert edge[1].sum() == 0 and edge[2][0] == 1


def test_save_and_load_round_trip(tmp_path) -> None:
    hu, mask = _z_ramp_volume()
    cfg = CropConfig(n_slices=4, channels=3, size=16, windows=IDENTITY_WINDOW)
    crops = extract_vertebra_crops(hu, mask, cfg)
    crops.slice_labels = slice_labels_from_boxes(crops, np.array([12]), cfg.half_width)
    assert crops.box_maps.shape == (7, 4, 16, 16) and not crops.box_maps.any()  # none drawn: empty maps
    crops.box_maps[1, 0, 2:5, 3:9] = 1
    path = save_crops(tmp_path / "study.npz", crops, mask_source="gt")
    back = load_crops(path)
    for name in ("images", "present", "slice_index", "z_range", "boxes", "slice_labels", "box_maps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(crops, name))
    images, slice_labels, box_maps = load_vertebra_stack(path, 1)
    np.testing.assert_array_equal(images, crops.images[1])
    np.testing.assert_array_equal(slice_labels, crops.slice_labels[1])
    np.testing.assert_array_equal(box_maps, crops.box_maps[1])
    assert [p.name for p in tmp_path.iterdir()] == ["study.npz"]  # no temporary left behind


def test_cache_from_a_synthetic_kaggle_layout_matches_the_phantom(tmp_path) -> None:
    """DICOM series + NIfTI → crops equal the crops cut from the generator's own arrays (orientation,
    slice order, file numbering and box slice numbers all survive the round trip)."""
    from rsna_cspine.crops import build_crop_cache
    from rsna_cspine.io.kaggle import KaggleLayout
    from rsna_cspine.synth import SynthConfig, make_phantom, write_dataset
    from rsna_cspine.synth.dataset import study_streams, study_uid

    synth = SynthConfig(n_studies=3, seed=5, image_size=64, test_fraction=0.0, prevalence_scale=2.5,
                        bbox_fraction=1.0, reversed_fraction=0.5, shuffled_fraction=0.5)
    root = tmp_path / "kaggle"
    write_dataset(root, synth, progress=False)
    layout = KaggleLayout(root)
    uids = [study_uid(synth, k) for k in range(3)]
    cfg = CropConfig(n_slices=6, channels=3, size=32)
    cache = tmp_path / "crops"
    index = build_crop_cache(layout, uids + ["1.2.3.missing"], "gt", cache, cfg)
    assert index["status"].tolist() == ["built", "built", "built", "failed"]
    assert index["mask_source"].tolist()[:3] == ["gt"] * 3 and index["error"].iloc[3]
    for k, uid in enumerate(uids):
        phantom = make_phantom(synth, study_streams(synth, k)[0])
        expected = extract_vertebra_crops(phantom.hu, phantom.labels, cfg, spacing=phantom.spacing)
        boxes = phantom.fracture_boxes if phantom.patient_overall else None
        box_z = None if boxes is None else np.array([b["z"] for b in boxes])
        rects = None if boxes is None else np.array([[b["x"], b["y"], b["width"], b["height"]] for b in boxes])
        got = load_crops(cache / f"{uid}.npz")
        np.testing.assert_array_equal(got.present, expected.present)
        np.testing.assert_array_equal(got.slice_index, expected.slice_index)
        np.testing.assert_array_equal(got.images, expected.images)
        np.testing.assert_array_equal(
            got.slice_labels, slice_labels_from_boxes(expected, box_z, cfg.half_width, rects, phantom.labels))
        np.testing.assert_array_equal(
            got.box_maps, box_maps_from_boxes(expected, box_z, cfg.half_width, rects, phantom.labels))
        # A map is drawn exactly where the slice label says there is a fracture.
        np.testing.assert_array_equal(got.box_maps.any(axis=(2, 3)), got.slice_labels == 1)
        # Each box marks only slices of the vertebra whose fracture it outlines (the generator knows which).
        for i, name in enumerate(VERTEBRAE):
            own = None if boxes is None else np.array([b["z"] for b in boxes if b["vertebra"] == name])
            if own is not None and got.present[i] and phantom.fractured[name]:
                near = np.abs(expected.slice_index[i][:, None] - own[None, :]) <= cfg.half_width
                assert (got.slice_labels[i] <= near.any(axis=1)).all(), name
        assert (got.slice_labels[[i for i, v in enumerate(phantom.fractured.values()) if v]] == 1).any()

    # Resumable: existing files are kept, only what is missing is built.
    (cache / f"{uids[1]}.npz").unlink()
    again = build_crop_cache(layout, uids, "gt", cache, cfg)
    assert again["status"].tolist() == ["cached", "built", "cached"]
    # Crop files made without the ledger are kept when their stacks fit these settings; a broken one is rebuilt.
    copied = tmp_path / "copied"
    copied.mkdir()
    for uid in uids:
        shutil.copy(cache / f"{uid}.npz", copied / f"{uid}.npz")
    (copied / f"{uids[2]}.npz").write_bytes(b"not a crop file")
    adopted = build_crop_cache(layout, uids, "gt", copied, cfg)
    assert adopted["status"].tolist() == ["cached", "cached", "built"] and adopted["mask_source"].eq("gt").all()
    np.testing.assert_array_equal(load_crops(copied / f"{uids[2]}.npz").images, load_crops(cache / f"{uids[2]}.npz").images)
    # Stage-1 masks: <uid>_mask.npz with key "mask"; a study without one fails alone.
    masks = tmp_path / "pred"
    masks.mkdir()
    phantom = make_phantom(synth, study_streams(synth, 0)[0])
    np.savez_compressed(masks / f"{uids[0]}_mask.npz", mask=phantom.labels)
    pred = build_crop_cache(layout, uids[:2], "pred", tmp_path / "crops_pred", cfg, pred_mask_dir=masks)
    assert pred["status"].tolist() == ["built", "failed"] and pred["mask_source"].iloc[0] == "pred"
    np.testing.assert_array_equal(load_crops(tmp_path / "crops_pred" / f"{uids[0]}.npz").images, load_crops(cache / f"{uids[0]}.npz").images)
    # A folder built with other settings is refused rather than silently mixed.
    with pytest.raises(ConfigError, match="other settings"):
        build_crop_cache(layout, uids, "gt", cache, CropConfig(n_slices=7, channels=3, size=32))


def test_a_box_counts_only_for_the_vertebra_its_rectangle_touches() -> None:
    # C1 (a ring-like block) and C2 (the dens inside it) share slices 4..11, side by side in x.
    hu = np.zeros((24, 40, 40), dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[2:12, 10:30, 4:16] = 1
    mask[4:22, 10:30, 22:36] = 2
    cfg = CropConfig(n_slices=6, channels=3, size=8, windows=((-400.0, 1500.0),))
    crops = extract_vertebra_crops(hu, mask, cfg)
    on_c2 = np.array([[24.0, 14.0, 6.0, 6.0]])  # (x, y, width, height) inside C2's columns
    z = np.array([8])
    by_slice = slice_labels_from_boxes(crops, z, cfg.half_width)
    assert by_slice[0].any() and by_slice[1].any()  # the slice rule alone marks both
    by_rect = slice_labels_from_boxes(crops, z, cfg.half_width, on_c2, mask)
    assert not by_rect[0].any() and by_rect[1].any()
    # A rectangle that touches no vertebra (a mask that missed the fracture) keeps the slice rule.
    nowhere = slice_labels_from_boxes(crops, z, cfg.half_width, np.array([[0.0, 0.0, 3.0, 3.0]]), mask)
    np.testing.assert_array_equal(nowhere, by_slice)


def test_box_maps_draw_the_counting_boxes_into_the_crop() -> None:
    hu = np.zeros((24, 40, 40), dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[2:12, 10:30, 4:16] = 1
    mask[4:22, 10:30, 20:40] = 2  # C2's crop square: 20 px (rows 10..30) → 10 crop pixels, 2 px each
    cfg = CropConfig(n_slices=6, channels=3, size=10, margin=0.0, windows=((-400.0, 1500.0),))
    crops = extract_vertebra_crops(hu, mask, cfg)
    y0, y1, x0, x1 = crops.boxes[1]
    assert (y1 - y0, x1 - x0) == (20, 20)
    rect = np.array([[x0 + 4.0, y0 + 6.0, 6.0, 4.0]])  # (x, y, width, height): crop columns 2..5, rows 3..5
    z = np.array([8])
    maps = box_maps_from_boxes(crops, z, cfg.half_width, rect, mask)
    labels = slice_labels_from_boxes(crops, z, cfg.half_width, rect, mask)
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[3:5, 2:5] = 1
    for slot in range(cfg.n_slices):
        np.testing.assert_array_equal(maps[1, slot], expected if labels[1, slot] == 1 else 0 * expected)
    assert labels[1].sum() >= 1
    assert not maps[0].any() and not maps[2:].any()  # the box touches only C2: C1's maps stay empty
    assert not box_maps_from_boxes(crops, None, cfg.half_width, None, mask).any()

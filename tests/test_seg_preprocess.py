"""Stage-1 preprocessing: grid sampling rules, HU windowing/resampling, label folding, cache files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rsna_cspine.seg.preprocess import (
    build_cache,
    fold_labels,
    load_cached_study,
    nearest_indices,
    preprocess_volume,
    resample_nearest,
    write_cache_file,
)
from tests.toy_volume import axial_volume


def test_nearest_indices_take_the_source_voxel_under_each_target_centre() -> None:
    # Shrinking 10 → 5: target i is centred at source coordinate 2i + 1.
    assert nearest_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    # Growing 3 → 6: each source voxel is covered by two target voxels.
    assert nearest_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert nearest_indices(7, 7).tolist() == list(range(7))


def test_resample_nearest_keeps_dtype_and_values() -> None:
    labels = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)
    out = resample_nearest(labels, (2, 3, 4))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert out[1, 2, 3] == labels[3, 5, 7]


def test_without_antialias_equals_one_trilinear_interpolation_of_the_window() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500, 2500, size=(23, 40, 36))
    low, high = -400.0, 1600.0
    expected = F.interpolate(
        torch.as_tensor((np.clip(hu, low, high) - low) / (high - low), dtype=torch.float32)[None, None],
        size=(16, 24, 20),
        mode="trilinear",
        align_corners=False,
    )[0].numpy()
    out = preprocess_volume(axial_volume(hu), (16, 24, 20), (low, high), antialias=False, chunk_slices=5)
    assert out.shape == (1, 16, 24, 20) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_antialias_averages_thin_structures_instead_of_skipping_them() -> None:
    # A 1-voxel bright plate every 4 voxels along x, shrunk 4×: a linear resize samples source
    # x = 4i + 1.5, between two dark voxels, and misses every plate; an antialiased resize averages
    # each 4-voxel period and sees a quarter of it bright.
    hu = np.full((8, 16, 64), -400.0)
    hu[:, :, 0::4] = 1600.0
    sampled = preprocess_volume(axial_volume(hu), (8, 16, 16), antialias=False)
    smooth = preprocess_volume(axial_volume(hu), (8, 16, 16), antialias=True)
    np.testing.assert_allclose(sampled, 0.0, atol=1e-6)
    np.testing.assert_allclose(smooth[0, :, :, 1:-1], 0.25, atol=0.02)


def test_chunking_does_not_change_the_result() -> None:
    rng = np.random.default_rng(1)
    volume = axial_volume(rng.normal(300, 500, size=(37, 32, 32)))
    a = preprocess_volume(volume, (16, 16, 16), chunk_slices=4)
    b = preprocess_volume(volume, (16, 16, 16), chunk_slices=100)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fold_labels_background_or_extra_class() -> None:
    labels = np.array([0, 1, 4, 7, 8, 12, 19, 25], dtype=np.uint8)
    assert fold_labels(labels, "background").tolist() == [0, 1, 4, 7, 0, 0, 0, 0]
    assert fold_labels(labels, "class").tolist() == [0, 1, 4, 7, 8, 8, 8, 0]
    with pytest.raises(ValueError, match="thoracic"):
        fold_labels(labels, "drop")


def test_cache_file_round_trip(tmp_path) -> None:
    image = np.random.default_rng(2).random((1, 4, 6, 8)).astype(np.float32)
    labels = np.zeros((4, 6, 8), np.uint8)
    labels[1, 2, 3], labels[2, 2, 3] = 3, 9  # a thoracic voxel (9 = T2)
    path = write_cache_file(tmp_path / "a.npz", image, labels, (40, 60, 80), (1.0, 0.5, 0.5))
    folded = load_cached_study(path, "background")
    np.testing.assert_allclose(folded["image"], image, atol=1e-3)  # stored as float16
    assert folded["label"].shape == (1, 4, 6, 8)
    assert folded["label"][0, 1, 2, 3] == 3 and folded["label"][0, 2, 2, 3] == 0
    assert load_cached_study(path, "class")["label"][0, 2, 2, 3] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary left behind


def test_build_cache_lists_a_broken_study_and_goes_on(tmp_path) -> None:
    pytest.importorskip("rsna_cspine.io.dicom")
    pytest.importorskip("rsna_cspine.io.nifti")
    from rsna_cspine.io.kaggle import KaggleLayout

    layout = KaggleLayout(tmp_path / "data")
    (layout.train_images / "1.2.3").mkdir(parents=True)
    (layout.train_images / "1.2.3" / "1.dcm").write_bytes(b"not a dicom")
    layout.segmentations.mkdir(parents=True)
    (layout.segmentations / "1.2.3.nii").write_bytes(b"not a nifti")
    done = build_cache(layout, ["1.2.3", "4.5.6"], tmp_path / "cache", (8, 8, 8), progress=False)
    assert done == {}
    failures = pd.read_csv(tmp_path / "cache" / "cache_failures.csv", dtype=str)
    assert failures["StudyInstanceUID"].tolist() == ["1.2.3", "4.5.6"]
    assert failures["error"].str.len().min() > 0


def test_build_cache_keeps_a_file_of_an_earlier_version_only_under_the_same_settings(tmp_path) -> None:
    from rsna_cspine.io.kaggle import KaggleLayout

    layout = KaggleLayout(tmp_path / "data")  # no images at all: only a kept file can succeed
    cache = tmp_path / "cache"
    image = np.zeros((1, 8, 8, 8), np.float32)
    path = write_cache_file(cache / "1.2.3.npz", image, np.zeros((8, 8, 8), np.uint8), (40, 60, 80), (1.0, 0.5, 0.5))
    assert build_cache(layout, ["1.2.3"], cache, (8, 8, 8), progress=False) == {"1.2.3": path}
    assert (cache / "finished" / "1.2.3.json").is_file()  # now recorded in the ledger
    # Another grid: the file is not this cache's, the study must be decoded again (and here cannot be).
    assert build_cache(layout, ["1.2.3"], cache, (4, 4, 4), progress=False) == {}
    assert pd.read_csv(cache / "cache_failures.csv", dtype=str)["StudyInstanceUID"].tolist() == ["1.2.3"]

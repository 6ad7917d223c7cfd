"""Stage-1 domain randomisation: the HU-band lookup, its seeding and contrast floor, and the training
pipeline keeping labels exact while intensities change (validation never randomised)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rsna_cspine.io.volume import Volume
from rsna_cspine.seg.config import SegAugmentConfig
from rsna_cspine.seg.data import build_transforms, make_dataset, make_loader
from rsna_cspine.seg.preprocess import preprocess_volume, resample_nearest, write_cache_file
from rsna_cspine.seg.randomise import BAND_EDGES_HU, RandHUBandRemapd, randomisation_transforms
from rsna_cspine.synth import SynthConfig, make_phantom

WINDOW = (-400.0, 1600.0)
GRID = (24, 40, 40)
#: Everything but the randomisation switched off, the randomisation always on.
ONLY_RANDOMISE = dict(affine_prob=0.0, flip_x_prob=0.0, noise_prob=0.0, intensity_scale_prob=0.0,
                      intensity_shift_prob=0.0, hu_remap_prob=1.0, bias_field_prob=1.0, blur_prob=1.0,
                      low_res_prob=1.0, gamma_prob=1.0)


def windowed(hu: np.ndarray) -> np.ndarray:
    return ((np.clip(hu, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).astype(np.float32)


def test_each_band_edge_gets_its_drawn_intensity_and_labels_are_untouched() -> None:
    remap = RandHUBandRemapd(["image"], WINDOW, prob=1.0)
    remap.set_random_state(0)
    knots_hu = np.array([WINDOW[0], *BAND_EDGES_HU, WINDOW[1]])
    image = windowed(knots_hu)[None]
    label = np.arange(len(knots_hu), dtype=np.uint8)[None]
    out = remap({"image": image, "label": label})
    assert out["label"] is label
    np.testing.assert_allclose(out["image"][0], remap.values, atol=1e-6)
    assert not np.allclose(remap.values, remap.knots)
    # Between two edges the lookup is linear; outside the window it clamps to the end values.
    mid = windowed(np.array([(BAND_EDGES_HU[2] + BAND_EDGES_HU[3]) / 2, -1000.0, 3000.0]))
    got = np.asarray(remap.lookup(mid))
    k = list(knots_hu).index(BAND_EDGES_HU[2])
    assert got[0] == pytest.approx((remap.values[k] + remap.values[k + 1]) / 2, abs=1e-6)
    assert got[1] == pytest.approx(remap.values[0]) and got[2] == pytest.approx(remap.values[-1])


def test_lookup_is_seeded_and_respects_its_probability() -> None:
    image = torch.linspace(0.0, 1.0, 1000).reshape(1, 10, 10, 10)
    outputs = []
    for seed in (1, 1, 2):
        remap = RandHUBandRemapd(["image"], WINDOW, prob=1.0)
        remap.set_random_state(seed)
        outputs.append(remap({"image": image})["image"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])
    never = RandHUBandRemapd(["image"], WINDOW, prob=0.0)
    assert never({"image": image})["image"] is image


def test_bone_keeps_a_contrast_floor_but_may_turn_darker_than_soft_tissue() -> None:
    remap = RandHUBandRemapd(["image"], WINDOW, prob=1.0, min_contrast=0.2)
    remap.set_random_state(5)
    soft = int(np.argmin(np.abs(remap.knots_hu - 50.0)))
    cortex = int(np.argmin(np.abs(remap.knots_hu - 800.0)))
    darker = 0
    for _ in range(400):
        remap.randomize()
        for i in remap.bone:
            assert abs(remap.values[i] - remap.values[soft]) >= 0.2 - 1e-9
        darker += remap.values[cortex] < remap.values[soft]
    assert 0.3 < darker / 400 < 0.7  # non-monotonic: bone is as often darker as brighter


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory) -> list[Path]:
    """Two small phantoms, preprocessed and cached exactly as stage 1 caches real studies."""
    folder = tmp_path_factory.mktemp("seg_cache")
    cfg = SynthConfig(image_size=64, n_slices=(40, 40), fov_head_fraction=0.0, fov_slab_fraction=0.0)
    paths = []
    for seed in (0, 1):
        ph = make_phantom(cfg, np.random.default_rng(seed))
        volume = Volume(hu=ph.hu.astype(np.float32), spacing=ph.spacing, positions=np.zeros((len(ph.hu), 3)),
                        row_cosine=np.array([1.0, 0, 0]), col_cosine=np.array([0, 1.0, 0]),
                        slice_numbers=np.arange(len(ph.hu)))
        image = preprocess_volume(volume, GRID, WINDOW)
        paths.append(write_cache_file(folder / f"s{seed}.npz", image, resample_nearest(ph.labels, GRID),
                                      ph.hu.shape, ph.spacing, WINDOW))
    return paths


def test_training_pipeline_changes_intensities_never_labels(phantom_cache) -> None:
    aug = SegAugmentConfig(**ONLY_RANDOMISE)
    train = make_dataset(phantom_cache, build_transforms(aug, GRID, "background", train=True, hu_window=WINDOW))
    plain = make_dataset(phantom_cache, build_transforms(aug, GRID, "background", train=False))
    for epoch in range(3):
        for k, batch in enumerate(make_loader(train, batch_size=1, shuffle=False, seed=0, epoch=epoch)):
            reference = plain[k]
            label = batch["label"][0]
            assert torch.equal(label, label.round())  # no interpolated label values
            assert torch.equal(label.to(torch.uint8), torch.as_tensor(reference["label"]))
            image = batch["image"][0]
            assert image.shape == torch.as_tensor(reference["image"]).shape
            assert (image - torch.as_tensor(reference["image"])).abs().mean() > 0.02
    # Seeded: the same (seed, epoch) gives the same images, another epoch other ones.
    first = [b["image"] for b in make_loader(train, batch_size=1, shuffle=False, seed=3, epoch=0)]
    again = [b["image"] for b in make_loader(train, batch_size=1, shuffle=False, seed=3, epoch=0)]
    other = [b["image"] for b in make_loader(train, batch_size=1, shuffle=False, seed=3, epoch=1)]
    for a, b, c in zip(first, again, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)


def test_validation_and_switched_off_training_see_the_cached_image(phantom_cache) -> None:
    aug = SegAugmentConfig(**ONLY_RANDOMISE)
    cached = np.load(phantom_cache[0])["image"].astype(np.float32)
    val = make_dataset(phantom_cache[:1], build_transforms(aug, GRID, "background", train=False))[0]
    np.testing.assert_array_equal(np.asarray(val["image"]), cached)
    assert randomisation_transforms(SegAugmentConfig(randomise=False), WINDOW) == []
    off = SegAugmentConfig(**{**ONLY_RANDOMISE, "randomise": False})
    item = make_dataset(phantom_cache[:1], build_transforms(off, GRID, "background", train=True))[0]
    np.testing.assert_array_equal(np.asarray(item["image"]), cached)
    names = [type(t).__name__ for t in randomisation_transforms(SegAugmentConfig(), WINDOW)]
    assert names == ["RandHUBandRemapd", "RandBiasFieldd", "RandGaussianSmoothd", "RandSimulateLowResolutiond",
                     "RandAdjustContrastd"]

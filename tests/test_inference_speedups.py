"""The fast inference paths agree with straightforward references: stage-1 upsampling, stage-2 layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from rsna_cspine.cls.model import FractureClassifier
from rsna_cspine.cls.predict import FractureEnsemble, cpu_has_native_bf16
from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.seg.masks import axis_histograms, mask_table, mixed_cells, table_from_histograms, upsample_linear


def reference_mask(probs: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """The plain definition: one trilinear interpolation of every class at full size, argmax, thoracic → 0."""
    labels = F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)[0].argmax(0)
    labels[labels > 7] = 0
    return labels.to(torch.uint8).numpy()


def smooth_probabilities(grid: tuple[int, int, int], n_classes: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurred one-hot boxes stacked along z, like a trained network's output: mixed cells only at borders."""
    rng = np.random.default_rng(seed)
    d, h, w = grid
    labels = np.zeros(grid, np.uint8)
    step = d // (n_classes + 1)
    for k in range(1, n_classes):
        y0, x0 = rng.integers(h // 4, h // 2), rng.integers(w // 4, w // 2)
        labels[k * step : (k + 1) * step, y0 : y0 + h // 4, x0 : x0 + w // 4] = k
    one_hot = np.stack([(labels == k).astype(np.float32) for k in range(n_classes)])
    one_hot = ndimage.gaussian_filter(one_hot, (0, 1.0, 1.0, 1.0)) + rng.uniform(0, 1e-3, one_hot.shape)
    return torch.as_tensor(one_hot / one_hot.sum(0, keepdims=True), dtype=torch.float32)


def assert_same_mask(mask: np.ndarray, expected: np.ndarray, histograms: list[np.ndarray]) -> None:
    # Float rounding may flip an exact tie; allow at most 1e-4 of the voxels, and no change in extents.
    assert mask.shape == expected.shape and mask.dtype == np.uint8
    assert (mask != expected).mean() <= 1e-4
    table, reference = table_from_histograms(histograms), mask_table(expected)
    for key in ("found", "z_min", "z_max", "y_min", "y_max", "x_min", "x_max"):
        assert table[key].tolist() == reference[key].tolist(), key
    for got, brute in zip(histograms, axis_histograms(mask)):
        np.testing.assert_array_equal(got, brute)


@pytest.mark.parametrize(
    "grid, shape",
    [((24, 16, 16), (90, 64, 64)),  # integer in-plane factor: the cropped fast path
     ((24, 16, 16), (37, 50, 45)),  # non-integer factor: whole-plane interpolation
     ((27, 16, 16), (27, 16, 16))],  # same size
)
def test_upsampling_of_smooth_probabilities_matches_the_full_interpolation(grid, shape) -> None:
    probs = smooth_probabilities(grid)
    mask, histograms = upsample_linear(probs, shape, chunk_slices=5)
    expected = reference_mask(probs, shape)
    assert set(np.unique(expected)) == set(range(8))  # every class made it through: the test bites
    assert_same_mask(mask, expected, histograms)


def test_upsampling_of_noisy_probabilities_and_a_thoracic_class() -> None:
    # Untrained-network noise: nearly every cell is mixed, so the whole plane is interpolated.
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.as_tensor(rng.normal(0, 2, (9, 10, 8, 8)), dtype=torch.float32), dim=0)
    shape = (33, 32, 24)
    mask, histograms = upsample_linear(probs, shape, chunk_slices=4)
    expected = reference_mask(probs, shape)
    assert mask.max() <= 7
    assert_same_mask(mask, expected, histograms)


def test_an_output_coarser_than_the_grid_that_reads_none_of_a_label_is_mapped_not_crashed() -> None:
    # Pixels larger than the grid's (a 64 px phantom at 3 mm on a 1.2 mm fine grid): 32 grid rows
    # become 10 output rows, which read grid rows 1, 4, 7, ... A one-voxel label on row 3 mixes cells
    # that no output row reads, so the interpolated box is empty: the grid lookup is the exact answer.
    probs = torch.zeros(8, 4, 32, 32)
    probs[0] = 1.0
    probs[0, :, 3, 3], probs[3, :, 3, 3] = 0.0, 1.0
    mask, histograms = upsample_linear(probs, (4, 10, 10), chunk_slices=4)
    expected = reference_mask(probs, (4, 10, 10))
    assert not expected.any()  # the label falls between the output's rows
    assert_same_mask(mask, expected, histograms)


def test_voxels_of_unmixed_cells_keep_their_grid_label() -> None:
    # The shortcut's premise, checked against brute force: a cell whose 8 corners share an argmax
    # interpolates to that argmax everywhere inside it.
    rng = np.random.default_rng(1)
    probs = smooth_probabilities((27, 16, 16), seed=1)
    grid_labels = probs.argmax(0).numpy().astype(np.uint8)
    mixed = mixed_cells(grid_labels)
    assert 0 < mixed.mean() < 0.5
    full = F.interpolate(probs[None], size=(81, 48, 48), mode="trilinear", align_corners=False)[0].argmax(0).numpy()
    src = [np.clip((np.arange(n) + 0.5) * g / n - 0.5, 0, g - 1).astype(int) for g, n in zip((27, 16, 16), (81, 48, 48))]
    lower = np.ix_(*src)
    unmixed = ~mixed[lower]
    np.testing.assert_array_equal(full[unmixed], grid_labels[lower][unmixed])
    # and a brute-force definition of "mixed" on random labels
    labels = rng.integers(0, 3, (5, 4, 6)).astype(np.uint8)
    for z, y, x in np.ndindex(labels.shape):
        corners = labels[z : z + 2, y : y + 2, x : x + 2]
        assert mixed_cells(labels)[z, y, x] == (len(np.unique(corners)) > 1)


def test_axis_histograms_count_every_label_along_every_axis() -> None:
    mask = np.random.default_rng(2).integers(0, 8, (7, 9, 11)).astype(np.uint8)
    for axis, hist in enumerate(axis_histograms(mask)):
        for label in range(8):
            other = tuple(a for a in range(3) if a != axis)
            np.testing.assert_array_equal(hist[label], (mask == label).sum(axis=other))


def tiny_ensemble(cpu_bf16: bool = False) -> tuple[FractureEnsemble, FractureClassifier]:
    torch.manual_seed(0)
    model = FractureClassifier("test_resnet", 3, head="gru", hidden=8).eval()
    plain = FractureClassifier("test_resnet", 3, head="gru", hidden=8).eval()
    plain.load_state_dict(model.state_dict())
    crop = CropConfig(n_slices=4, channels=3, size=32)
    return FractureEnsemble([model], crop, torch.device("cpu"), batch_size=7, cpu_bf16=cpu_bf16), plain


def test_channels_last_ensemble_equals_the_plain_fp32_model() -> None:
    ensemble, plain = tiny_ensemble()
    stacks = np.random.default_rng(0).integers(0, 256, (7, 4, 3, 32, 32), dtype=np.uint8)
    with torch.inference_mode():
        logits = plain(torch.from_numpy(stacks.astype(np.float32) / 255.0))["logit"]
    np.testing.assert_allclose(ensemble.predict_stacks(stacks), torch.sigmoid(logits).numpy(), atol=1e-4)
    assert not ensemble.cpu_bf16


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_on_cpu_stays_close_to_fp32() -> None:
    ensemble, _ = tiny_ensemble(cpu_bf16=True)
    reference, _ = tiny_ensemble()
    stacks = np.random.default_rng(0).integers(0, 256, (7, 4, 3, 32, 32), dtype=np.uint8)
    assert ensemble.cpu_bf16
    np.testing.assert_allclose(ensemble.predict_stacks(stacks), reference.predict_stacks(stacks), atol=2e-2)

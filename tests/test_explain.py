"""Explanations: Grad-CAM location and orientation, display orientation, overlays, ``explain`` end to end.

The Grad-CAM tests train a tiny real classifier (timm ``test_resnet`` + attention head) for a few
seconds on stacks where a fracture is "a bright square in the top-right corner of one slice": a
correct Grad-CAM must then light up that corner of that slice, and a transposed or flipped map
(or one with its slices shuffled) cannot.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from rsna_cspine.cls.model import FractureClassifier
from rsna_cspine.constants import TARGET_COLUMNS, VERTEBRAE
from rsna_cspine.errors import ConfigError
from rsna_cspine.io.volume import Volume
from rsna_cspine.report.explain import StudyExplainer
from rsna_cspine.report.pictures import LABEL_COLOURS, axial_view, display_flips, overlay_labels, sagittal_view
from rsna_cspine.cls.model import last_stage_name
from rsna_cspine.report.gradcam import StackGradCAM

torch.set_num_threads(1)

N_SLICES, CHANNELS, SIZE = 3, 3, 64
PATCH = (slice(4, 20), slice(SIZE - 20, SIZE - 4))  # rows near the top, columns near the right


def _stacks(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise stacks; positives carry a bright square at PATCH on one random slice."""
    x = rng.random((n, N_SLICES, CHANNELS, SIZE, SIZE), dtype=np.float32) * 0.3
    y = rng.random(n) < 0.5
    for i in np.flatnonzero(y):
        x[i, rng.integers(N_SLICES), :, PATCH[0], PATCH[1]] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


@pytest.fixture(scope="module")
def corner_model() -> FractureClassifier:
    torch.manual_seed(0)
    model = FractureClassifier("test_resnet", CHANNELS, head="attention", hidden=16, dropout=0.0, slice_logits=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        x, y = _stacks(16, rng)
        loss = F.binary_cross_entropy_with_logits(model(x)["logit"], y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    x, y = _stacks(64, rng)
    with torch.no_grad():
        accuracy = float(((model(x)["logit"] > 0) == (y > 0.5)).float().mean())
    assert accuracy > 0.95, f"the corner model did not learn its task (accuracy {accuracy:.2f})"
    return model


def _positive_stack(slice_with_patch: int, seed: int = 1) -> np.ndarray:
    stack = np.random.default_rng(seed).random((N_SLICES, CHANNELS, SIZE, SIZE), dtype=np.float32) * 0.3
    stack[slice_with_patch, :, PATCH[0], PATCH[1]] = 1.0
    return stack


@pytest.mark.parametrize("slice_with_patch", [0, 2])
def test_gradcam_peaks_on_the_evidence_slice_and_corner(
    corner_model: FractureClassifier, slice_with_patch: int
) -> None:
    result = StackGradCAM([corner_model])(_positive_stack(slice_with_patch))
    cam = result.cam
    assert cam.shape == (N_SLICES, SIZE, SIZE)  # upsampled to the crop size
    assert result.peak > 0 and math.isclose(float(cam.max()), 1.0, rel_tol=1e-6) and float(cam.min()) >= 0.0
    assert result.logit > 0  # the model calls this stack fractured
    per_slice = cam.reshape(N_SLICES, -1).max(axis=1)
    assert int(per_slice.argmax()) == slice_with_patch
    assert np.delete(per_slice, slice_with_patch).max() < 0.5 * per_slice[slice_with_patch]
    y, x = np.unravel_index(int(cam[slice_with_patch].argmax()), cam[slice_with_patch].shape)
    assert y < SIZE // 2 and x >= SIZE // 2, f"peak at row {y}, column {x}: not the top-right corner"
    half = SIZE // 2
    top_right = cam[slice_with_patch, :half, half:].mean()
    for name, quadrant in {
        "top-left (flipped left-right)": cam[slice_with_patch, :half, :half],
        "bottom-right (flipped up-down)": cam[slice_with_patch, half:, half:],
        "bottom-left (transposed)": cam[slice_with_patch, half:, :half],
    }.items():
        assert quadrant.mean() < 0.5 * top_right, f"Grad-CAM as strong in the {name} quadrant"


def _gradcam_by_definition(
    model: FractureClassifier, layer: torch.nn.Module, stack: np.ndarray
) -> tuple[np.ndarray, float]:
    """Independent Grad-CAM: hook ``layer``, weight each channel by its mean gradient, ReLU, upsample.

    Returns the raw (unscaled) map ``(N, H, W)`` and the logit.
    """
    acts: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        acts.append(output)

    handle = layer.register_forward_hook(keep)
    try:
        logit = model(torch.from_numpy(stack)[None])["logit"]
        logit.sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    activation = acts[0]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    raw = F.relu((weights * activation).sum(1, keepdim=True))
    raw = F.interpolate(raw, size=stack.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return raw.detach().numpy(), float(logit.detach())


def test_gradcam_matches_the_definition(corner_model: FractureClassifier) -> None:
    stack = _positive_stack(1, seed=5)
    expected, logit = _gradcam_by_definition(corner_model, corner_model.backbone.layer4, stack)
    result = StackGradCAM([corner_model])(stack)
    np.testing.assert_allclose(result.cam * result.peak, expected, rtol=1e-4, atol=1e-5 * expected.max())
    assert math.isclose(result.logit, logit, rel_tol=1e-5)


def test_gradcam_leaves_the_prediction_model_untouched(corner_model: FractureClassifier) -> None:
    stack = torch.from_numpy(_positive_stack(0))[None]
    with torch.no_grad():
        before = corner_model(stack)["logit"].clone()
    StackGradCAM([corner_model, corner_model])(stack[0].numpy())
    assert not corner_model.backbone.layer4._forward_hooks and not corner_model.backbone.layer4._backward_hooks
    assert all(p.grad is None for p in corner_model.parameters())
    with torch.no_grad():
        assert torch.equal(corner_model(stack)["logit"], before)


def test_target_stage_comes_from_timm_feature_info() -> None:
    import timm

    assert last_stage_name(timm.create_model("test_resnet", num_classes=0)) == "layer4"
    assert last_stage_name(timm.create_model("test_convnext", num_classes=0)) == "stages.3"
    with pytest.raises(ConfigError, match="no feature stage"):
        last_stage_name(torch.nn.Linear(3, 3))


def test_gradcam_works_with_a_gru_head_and_another_backbone() -> None:
    """A ConvNeXt backbone (target stage ``stages.3``) under a GRU head: the map is the definition's, scaled
    so that its peak is 1 (an all-zero or unscaled map fails)."""
    torch.manual_seed(1)
    model = FractureClassifier("test_convnext", 5, head="gru", hidden=8).eval()
    stack = np.random.default_rng(0).random((4, 5, 48, 48), dtype=np.float32)
    expected, logit = _gradcam_by_definition(model, model.backbone.stages[3], stack)
    result = StackGradCAM([model])(stack)
    assert result.cam.shape == (4, 48, 48) and result.cam.dtype == np.float32
    assert result.peak > 0 and result.peak == pytest.approx(float(expected.max()), rel=1e-4)
    assert float(result.cam.max()) == pytest.approx(1.0, rel=1e-6) and float(result.cam.min()) >= 0.0
    np.testing.assert_allclose(result.cam * result.peak, expected, rtol=1e-4, atol=1e-5 * expected.max())
    assert math.isclose(result.logit, logit, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# Display orientation and overlays
# ----------------------------------------------------------------------------------------------


def _volume(row_cosine: tuple[float, float, float], col_cosine: tuple[float, float, float]) -> Volume:
    """A 6×10×12 volume with a marker at the patient's most anterior-right voxel of slice 2."""
    hu = np.zeros((6, 10, 12), dtype=np.float32)
    row, col = np.asarray(row_cosine), np.asarray(col_cosine)
    # Anterior = -P (LPS y); right = -L (LPS x). Pick the array index at that end of each axis.
    y = 0 if col[1] > 0 else 9
    x = 0 if row[0] > 0 else 11
    hu[2, y, x] = 1000.0
    return Volume(hu=hu, spacing=(2.0, 0.5, 0.5), positions=np.array([[0.0, 0.0, -2.0 * k] for k in range(6)]),
                  row_cosine=row, col_cosine=col, slice_numbers=np.arange(6))


@pytest.mark.parametrize(
    "row_cosine, col_cosine",
    [((1, 0, 0), (0, 1, 0)), ((-1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, -1, 0)), ((-1, 0, 0), (0, -1, 0))],
)
def test_views_show_anterior_up_right_on_the_left_and_superior_up(row_cosine, col_cosine) -> None:
    volume = _volume(row_cosine, col_cosine)
    mask = (volume.hu > 0).astype(np.uint8) * 3
    image, labels = axial_view(volume, mask, 2)
    assert image[0, 0] == 1000.0 and labels[0, 0] == 3  # anterior-right corner drawn at the top-left
    x = int(np.argwhere(volume.hu[2] > 0)[0, 1])
    sagittal, sag_labels = sagittal_view(volume, mask, x)
    assert sagittal.shape == (6, 10)
    assert sagittal[2, 0] == 1000.0 and sag_labels[2, 0] == 3  # slice 2 from the top, anterior on the left
    assert display_flips(volume) == (col_cosine[1] < 0, row_cosine[0] < 0)


def test_overlay_colours_only_the_labelled_pixels() -> None:
    grey = np.full((4, 5), 0.5, dtype=np.float32)
    labels = np.zeros((4, 5), dtype=np.uint8)
    labels[0, 0], labels[1, 1], labels[2, 2] = 2, 5, 9  # 9: thoracic, not drawn
    rgb = overlay_labels(grey, labels, highlight=5, alpha=0.3)
    np.testing.assert_allclose(rgb[0, 0], 0.7 * 0.5 + 0.3 * LABEL_COLOURS[1], rtol=1e-6)
    np.testing.assert_allclose(rgb[1, 1], 0.4 * 0.5 + 0.6 * LABEL_COLOURS[4], rtol=1e-6)
    untouched = labels == 0
    untouched[2, 2] = True
    assert np.all(rgb[untouched] == 0.5)


# ----------------------------------------------------------------------------------------------
# explain end to end (tiny untrained models from the pipeline tests)
# ----------------------------------------------------------------------------------------------


def test_explain_writes_every_picture_with_the_pipeline_probabilities(tmp_path: Path, tiny_models: Path) -> None:
    from rsna_cspine.inference import FracturePipeline, PipelineConfig
    from tests.toy_pipeline import GOOD, make_tiny_dataset

    study = make_tiny_dataset(tmp_path / "data", uids=GOOD[:1], broken=False) / "test_images" / GOOD[0]
    pipeline = FracturePipeline.from_models_dir(tiny_models, PipelineConfig(device="cpu"))
    loads: list[Path] = []
    real_load = pipeline.load
    pipeline.load = lambda folder: loads.append(Path(folder)) or real_load(folder)  # counts, still loads
    seen: list[float] = []
    result = StudyExplainer(pipeline).explain(study, tmp_path / "out", progress=lambda m, f: seen.append(f))
    assert loads == [study]  # one pass: the pictures come from the prediction's own volume and mask
    assert result.prediction.intermediates is None  # the kept result does not hold the volume

    expected = pipeline.predict_study(study).probs
    assert [result.probabilities[c] for c in TARGET_COLUMNS] == pytest.approx(expected.tolist(), abs=1e-12)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert [v.vertebra for v in result.vertebrae] == list(VERTEBRAE)
    for item in result.vertebrae:
        assert set(item.pictures) == ({"views", "crops", "gradcam"} if item.found else {"views"})
        for path in item.pictures.values():
            image = imread(path)
            assert image.ndim == 3 and min(image.shape[:2]) > 200 and image[..., :3].std() > 0.05
    assert imread(result.overview).shape[0] > 300
    table = result.table.read_text().splitlines()
    assert table[0] == "target,probability,found,qc" and len(table) == 9
    # Stage 1's quality-check verdicts travel with the pictures; a dropped vertebra is never cropped.
    verdicts = result.prediction.qc
    for item in result.vertebrae:
        assert item.qc in ("ok", "absent") or item.qc.startswith("dropped: ")
        assert item.found == (item.qc == "ok")
        if item.qc.startswith("dropped"):
            assert f"{item.vertebra} dropped" in verdicts

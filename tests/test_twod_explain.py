"""Explaining 2D predictions and the torchvision backbones: vanilla-gradient saliency follows the fracture
(its map changes where the fracture changes), Grad-CAM on channels-last (Swin) and torchvision trunks, and
AlexNet / GoogLeNet weights from a local file only, without their ImageNet layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from scipy import ndimage
from torchvision import models

from rsna_cspine.cli import main as cli_main
from rsna_cspine.errors import ConfigError
from rsna_cspine.twod.gradcam import image_gradcam
from rsna_cspine.twod.model import ImageClassifier
from rsna_cspine.twod.predict import load_image_classifier
from rsna_cspine.twod.saliency import image_saliency
from rsna_cspine.twod.synth import Synth2DConfig, make_radiograph
from rsna_cspine.twod.tvmodels import SPECS, create_trunk, trunk_features

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
SIZE = 64


@pytest.fixture(scope="module")
def fracture_model(tmp_path_factory) -> Path:
    """A small classifier trained briefly on fracture vs normal synthetic radiographs."""
    root = tmp_path_factory.mktemp("explain")
    assert cli_main(["synth-2d", str(root / "xr"), "--per-class", "40", "--seed", "4", "--size", str(SIZE)]) == 0
    run = root / "run"
    assert cli_main(["train-2d", "--config", str(REPO / "configs" / "twod_cpu.yaml"), "--data", str(root / "xr"),
                     f"run_dir={run}", f"data.image_size={SIZE}", "train.threads=1", "train.epochs=8",
                     "train.patience=0", "train.max_minutes=0"]) == 0
    return run / "best.pt"


def _twins(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fractured radiograph and the same one with the fracture (wedge and lucent line) drawn at severity 0:
    every other random draw, noise included, is the same, so the images differ only at the fracture."""
    images = [make_radiograph("fracture", np.random.default_rng(seed), Synth2DConfig(size=SIZE, severity=severity))
              for severity in (1.0, 0.0)]
    return images[0], images[1]


def test_saliency_is_non_trivial_and_follows_the_fracture_region(fracture_model: Path) -> None:
    predictor = load_image_classifier(fracture_model, "cpu")
    fracture = predictor.classes.index("fracture")
    inside_changes, outside_changes = [], []
    for seed in range(4):
        broken, intact = _twins(seed)
        region = ndimage.binary_dilation(np.abs(broken - intact) > 0.05, iterations=2)
        assert 0 < region.mean() < 0.2
        maps = []
        for image in (broken, intact):
            result = image_saliency(predictor.model, image[None], class_index=fracture)
            assert result.saliency.shape == (SIZE, SIZE) and np.isfinite(result.saliency).all()
            assert result.peak > 0 and result.saliency.max() == pytest.approx(1.0)
            assert result.saliency.std() > 0.05  # not a flat map
            assert result.probs.sum() == pytest.approx(1.0, abs=1e-5)
            maps.append(result.saliency * result.peak)  # raw gradient magnitudes, comparable between the twins
        change = np.abs(maps[0] - maps[1])
        inside_changes.append(change[region].mean())
        outside_changes.append(change[~region].mean())
    # Repairing the fracture changes the gradient most where the fracture was (per pixel, twice as much at least).
    assert np.mean(inside_changes) > 2 * np.mean(outside_changes), (inside_changes, outside_changes)


def test_torchvision_trunks_load_local_weights_without_their_imagenet_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = models.googlenet(weights=None, aux_logits=True, init_weights=False)  # the hub file keeps aux heads
    torch.save(source.state_dict(), tmp_path / "googlenet.pth")
    model = ImageClassifier("tv/googlenet", 3, 3, pretrained_file=str(tmp_path / "googlenet.pth"), head="fc2",
                            drop_rate=0.5).eval()
    trunk = model.backbone.state_dict()
    assert torch.equal(trunk["inception5b.branch1.conv.weight"], source.state_dict()["inception5b.branch1.conv.weight"])
    assert not any(k.startswith(("aux1", "aux2", "fc.")) for k in trunk)
    assert model.backbone.transform_input  # the ported ImageNet weights expect it
    assert model.input_norm.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    # Rebuilt without the file (as from a checkpoint), the network computes the same function.
    rebuilt = ImageClassifier("tv/googlenet", 3, 3, head="fc2", drop_rate=0.5, pretrained_norm=True).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    for name, spec in SPECS.items():
        assert trunk_features(create_trunk(f"tv/{name}", 3)[0]) == spec.features
    with pytest.raises(ConfigError, match="weights do not fit tv/alexnet"):
        ImageClassifier("tv/alexnet", 3, 2, pretrained_file=str(tmp_path / "googlenet.pth"))
    with pytest.raises(ConfigError, match="torchvision.models as m"):
        ImageClassifier("tv/alexnet", 3, 2, pretrained_file=str(tmp_path / "alexnet-owt.pth"))
    with pytest.raises(ConfigError, match="data.in_chans=3"):
        ImageClassifier("tv/alexnet", 1, 2)
    with pytest.raises(ConfigError, match="offered: tv/alexnet, tv/googlenet"):
        ImageClassifier("tv/vgg16", 3, 2)


def test_random_weights_start_where_training_can_move_them() -> None:
    """From random weights: He init keeps the signal's size through a random AlexNet's seven ReLU layers
    (torchvision's default layer init, the baseline, shrinks it several hundred times, and the differences
    between images with it), and a new timm classifier starts near uniform (timm's own init of MobileNetV2's
    2-class layer, the baseline, starts with logits of SD ~3, so that the first epochs go into shrinking them)."""
    torch.manual_seed(0)
    images = torch.rand(8, 3, 64, 64)
    images[:4] *= torch.linspace(0.2, 1.0, 64)  # two kinds of image, so that features have something to tell
    default = models.alexnet(weights=None)
    default.classifier = default.classifier[:-1]
    trunk, _ = create_trunk("tv/alexnet", 3)
    with torch.no_grad():
        ours, theirs = trunk.eval()(images), default.eval()(images)
    assert 0.3 < float(ours.std()) < 30 and float(theirs.std()) < 0.05, (float(ours.std()), float(theirs.std()))
    assert float(ours.std(0).mean()) > 50 * float(theirs.std(0).mean())  # images told apart at a usable scale
    with torch.no_grad():
        fresh = ImageClassifier("mobilenetv2_100", 3, 2).train()(images)
        timm_own = timm.create_model("mobilenetv2_100", num_classes=2).train()(images)
    assert float(fresh.std()) < 1.0 < float(timm_own.std()), (float(fresh.std()), float(timm_own.std()))


@pytest.mark.slow
def test_alexnet_weights_file_is_read_and_its_fc8_dropped(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.alexnet(weights=None)
    torch.save(source.state_dict(), tmp_path / "alexnet.pth")  # 240 MB, as torchvision's
    model = ImageClassifier("tv/alexnet", 3, 3, pretrained_file=str(tmp_path / "alexnet.pth"), head="fc2")
    trunk = model.backbone.state_dict()
    for key in ("features.0.weight", "classifier.1.weight", "classifier.4.weight"):
        assert torch.equal(trunk[key], source.state_dict()[key]), key
    assert "classifier.6.weight" not in trunk and model.head[-1].out_features == 3


@pytest.mark.parametrize("backbone", ["swin_s3_tiny_224", "tv/alexnet"])
def test_gradcam_and_saliency_on_channels_last_and_torchvision_backbones(backbone: str) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(backbone, 3, 2, image_size=SIZE).eval()
    image = np.random.default_rng(0).random((3, SIZE, SIZE)).astype(np.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = image_gradcam(model, image)
    assert cam.cam.shape == (SIZE, SIZE) and np.isfinite(cam.cam).all() and 0 <= cam.cam.min() <= cam.cam.max() <= 1
    saliency = image_saliency(model, image, class_index=1)
    assert saliency.class_index == 1 and saliency.saliency.shape == (SIZE, SIZE) and saliency.peak > 0
    with torch.no_grad():  # the explained copies were changed, not the model
        x = torch.from_numpy(image)[None]
        torch.testing.assert_close(model.class_probs(model(x))[0], torch.from_numpy(cam.probs))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

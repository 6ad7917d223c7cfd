"""Stage-2 model: timm backbones with any channel count, each head, local pretrained weights only."""

from __future__ import annotations

import socket

import pytest
import timm
import torch

from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.model import FractureClassifier, build_classifier
from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.errors import ConfigError

torch.set_num_threads(1)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext"])
@pytest.mark.parametrize("in_chans", [5, 6])
@pytest.mark.parametrize("head", ["gru", "lstm", "attention"])
def test_output_shapes(backbone: str, in_chans: int, head: str) -> None:
    torch.manual_seed(0)
    model = FractureClassifier(backbone, in_chans, head=head, hidden=16).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 4, in_chans, 32, 32))
    assert out["logit"].shape == (3,)
    assert out["slice_logits"].shape == (3, 4)
    assert torch.isfinite(out["logit"]).all() and torch.isfinite(out["slice_logits"]).all()


def test_backbone_with_a_pre_logits_layer() -> None:
    # MobileNetV3 returns head_hidden_size (1024) features, not num_features (288), once its classifier is removed.
    model = FractureClassifier("mobilenetv3_small_050", 5, head="gru", hidden=8).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 5, 32, 32))["logit"].shape == (2,)


def test_without_slice_output() -> None:
    model = FractureClassifier("test_resnet", 3, head="gru", hidden=8, slice_logits=False).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3, 32, 32))
    assert out["slice_logits"] is None and out["logit"].shape == (2,)


def test_attention_pooling_ignores_slice_order_but_gru_does_not() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 5, 3, 32, 32)
    perm = torch.tensor([4, 2, 0, 3, 1])
    attention = FractureClassifier("test_resnet", 3, head="attention", hidden=16).eval()
    gru = FractureClassifier("test_resnet", 3, head="gru", hidden=16).eval()
    with torch.no_grad():
        a, a_perm = attention(x)["logit"], attention(x[:, perm])["logit"]
        g, g_perm = gru(x)["logit"], gru(x[:, perm])["logit"]
        s, s_perm = attention(x)["slice_logits"], attention(x[:, perm])["slice_logits"]
    torch.testing.assert_close(a, a_perm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s[:, perm], s_perm, rtol=1e-4, atol=1e-5)  # per-slice outputs follow their slice
    assert not torch.allclose(g, g_perm, atol=1e-6)


def test_slices_are_encoded_independently_of_the_batch() -> None:
    model = FractureClassifier("test_convnext", 5, head="lstm", hidden=8).eval()
    x = torch.rand(3, 4, 5, 32, 32)
    with torch.no_grad():
        together = model(x)["logit"]
        alone = torch.stack([model(x[i : i + 1])["logit"][0] for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_pretrained_weights_come_from_the_local_file_only(tmp_path, monkeypatch) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)  # 3 channels, 1000-class head
    weights = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), weights)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = FractureClassifier("test_resnet", 6, head="gru", hidden=8, pretrained_file=str(weights))
    loaded, original = model.backbone.state_dict(), source.state_dict()
    stem = "conv1.0.weight"
    for name, tensor in loaded.items():
        if name != stem:
            torch.testing.assert_close(tensor, original[name])
    assert "fc.weight" not in loaded  # the ImageNet classifier was dropped
    assert loaded[stem].shape[1] == 6
    # timm spreads the RGB filters over the new channels, keeping each filter's response to a uniform input.
    torch.testing.assert_close(loaded[stem].sum(1), original[stem].sum(1), rtol=1e-4, atol=1e-5)

    scratch = FractureClassifier("test_resnet", 6, head="gru", hidden=8)
    assert not torch.equal(scratch.backbone.state_dict()["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])


def test_missing_pretrained_file_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        FractureClassifier("test_resnet", 3, pretrained_file=str(tmp_path / "absent.pth"))


def test_build_classifier_takes_channels_from_the_crop_config() -> None:
    cfg = ClsConfig()
    cfg.model.backbone, cfg.model.hidden, cfg.model.head = "test_resnet", 8, "attention"
    cfg.data.crop = CropConfig(n_slices=3, channels=3, size=32, add_mask_channel=True, windows=((-400.0, 1500.0), (0.0, 100.0)))
    model = build_classifier(cfg)
    assert model.backbone.state_dict()["conv1.0.weight"].shape[1] == 7
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 7, 32, 32))["logit"].shape == (2,)
    cfg.model.head = "transformer"
    with pytest.raises(ConfigError):
        build_classifier(cfg)


def test_global_max_pool_takes_the_strongest_location() -> None:
    model = FractureClassifier("test_resnet", 3, head="gru", hidden=8, global_pool="max").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.backbone(x)
        feature_map = model.backbone.forward_features(x)
    torch.testing.assert_close(pooled, feature_map.amax(dim=(2, 3)))
    assert not torch.allclose(pooled, feature_map.mean(dim=(2, 3)))


def test_vertebra_bias_adds_one_learned_offset_per_vertebra() -> None:
    torch.manual_seed(0)
    model = FractureClassifier("test_resnet", 3, head="gru", hidden=8, vertebra_bias=True).eval()
    x = torch.rand(7, 4, 3, 32, 32)
    which = torch.arange(7)
    with torch.no_grad():
        base = model(x)["logit"]
        torch.testing.assert_close(model(x, which)["logit"], base)  # zero at initialisation
        model.vertebra_bias.weight.copy_(torch.linspace(-3, 3, 7)[:, None])
        torch.testing.assert_close(model(x, which)["logit"] - base, torch.linspace(-3, 3, 7))
        torch.testing.assert_close(model(x)["logit"], base)  # no index given: no offset (Grad-CAM)
    plain = FractureClassifier("test_resnet", 3, head="gru", hidden=8).eval()
    assert plain.vertebra_bias is None
    with torch.no_grad():
        plain(x, which)  # accepted and ignored


def test_ensemble_passes_each_present_vertebra_its_own_offset() -> None:
    import numpy as np

    from rsna_cspine.cls.predict import FractureEnsemble
    from rsna_cspine.crops import VertebraCrops

    torch.manual_seed(1)
    model = FractureClassifier("test_resnet", 3, head="gru", hidden=8, vertebra_bias=True).eval()
    with torch.no_grad():
        model.vertebra_bias.weight.copy_(torch.linspace(-2, 2, 7)[:, None])
    reference = copy_of(model)
    crop = CropConfig(n_slices=4, channels=3, size=32)
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 3, 32, 32), dtype=np.uint8)
    present = np.array([True, False, True, True, False, True, True])
    crops = VertebraCrops(images=images, present=present, slice_index=np.zeros((7, 4), np.int32),
                          z_range=np.zeros((7, 2), np.int32), boxes=np.zeros((7, 4), np.int32))
    probs = FractureEnsemble([model], crop, torch.device("cpu"), batch_size=3).predict(crops)
    idx = np.flatnonzero(present)
    with torch.no_grad():
        logits = reference(torch.from_numpy(images[idx].astype(np.float32) / 255.0), torch.from_numpy(idx))["logit"]
    np.testing.assert_allclose(probs[idx], torch.sigmoid(logits).numpy(), atol=1e-4)
    assert np.isnan(probs[~present]).all()


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()

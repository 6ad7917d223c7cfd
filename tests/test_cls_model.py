"""Stage-2 model: timm backbones with any channel count, each head, local pretrained weights only."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import timm
import torch

from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.cls.model import FractureClassifier, build_classifier
from rsna_cspine.crops.extract import CropConfig
from rsna_cspine.errors import ConfigError
from tests.paths import REPO_ROOT

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


def test_global_pool_setting_travels_from_the_config_through_the_checkpoint(tmp_path) -> None:
    """``model.global_pool`` reaches the backbone and the predictor rebuilds it from the checkpoint: the
    rebuilt ensemble predicts what the trained model predicts, and the same weights pooled by the default
    (avg) predict otherwise, so the setting is carried, not defaulted."""
    from rsna_cspine.cls.predict import load_classifiers
    from rsna_cspine.config import to_dict
    from rsna_cspine.engine import save_checkpoint

    torch.manual_seed(0)
    cfg = ClsConfig()
    cfg.model.backbone, cfg.model.hidden, cfg.model.head, cfg.model.global_pool = "test_resnet", 8, "gru", "max"
    cfg.data.crop = CropConfig(n_slices=3, channels=3, size=64, add_mask_channel=False)  # a 2×2 last feature map
    model = build_classifier(cfg, load_pretrained=False).eval()
    cfg.model.global_pool = "avg"
    averaged = build_classifier(cfg, load_pretrained=False).eval()
    averaged.load_state_dict(model.state_dict())
    cfg.model.global_pool = "max"
    ensemble = load_classifiers([save_checkpoint(tmp_path / "max.pt", model=model, epoch=1, config=to_dict(cfg))],
                                torch.device("cpu"))
    stacks = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.sigmoid(model(stacks.float() / 255)["logit"]).numpy()
        other = torch.sigmoid(averaged(stacks.float() / 255)["logit"]).numpy()
    np.testing.assert_allclose(ensemble.predict_stacks(stacks.numpy()), expected, rtol=1e-5)
    assert not np.allclose(expected, other, rtol=1e-3)


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

    # A stored vertebra calibration acts on each model's logit before the models are averaged.
    from rsna_cspine.calibration import VertebraCalibration

    fits = [VertebraCalibration(0.5, -1.0, 100, 20), None]
    pair = FractureEnsemble([model, copy_of(model)], crop, torch.device("cpu"), batch_size=3, vertebra_calibrations=fits)
    expected = (torch.sigmoid(0.5 * logits - 1.0) + torch.sigmoid(logits)).numpy() / 2
    np.testing.assert_allclose(pair.predict(crops)[idx], expected, atol=1e-4)
    with pytest.raises(ConfigError, match="1 vertebra calibrations for 2 models"):
        FractureEnsemble([model, copy_of(model)], crop, torch.device("cpu"), vertebra_calibrations=fits[:1])


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


# ------------------------------------------------------------------ pretrained files and input normalisation


def _save_timm_weights(path, name: str = "test_resnet", seed: int = 3, wrap: str | None = None):
    """A timm model's ImageNet-shaped state dict (3 channels, 1000 classes) written as timm caches it."""
    torch.manual_seed(seed)
    source = timm.create_model(name, pretrained=False)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({wrap: source.state_dict()} if wrap else source.state_dict(), path)
    return source.eval()


def _cls_config(tmp_path, pretrained_file, channels: int = 3, mask: bool = False) -> ClsConfig:
    cfg = ClsConfig()
    cfg.model.backbone, cfg.model.hidden, cfg.model.head = "test_resnet", 8, "gru"
    cfg.model.pretrained_file = None if pretrained_file is None else str(pretrained_file)
    cfg.data.crop = CropConfig(n_slices=3, channels=channels, size=32, add_mask_channel=mask)
    cfg.run_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize("file_name, wrap", [("w.safetensors", None), ("w.pth", None), ("w.pth", "state_dict")])
def test_model_pretrained_file_loads_adapts_the_stem_and_normalises_like_the_backbone(tmp_path, file_name, wrap) -> None:
    source = _save_timm_weights(tmp_path / file_name, wrap=wrap)
    cfg = _cls_config(tmp_path, tmp_path / file_name, channels=5, mask=True)  # 6 channels per slice
    model = build_classifier(cfg).eval()
    loaded, original = model.backbone.state_dict(), source.state_dict()
    torch.testing.assert_close(loaded["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])
    assert loaded["conv1.0.weight"].shape[1] == 6 and "fc.weight" not in loaded
    # test_resnet's pretrained_cfg says mean 0.5, std 0.5; the scratch centring (std 0.25) must be gone.
    assert source.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    torch.testing.assert_close(model.input_norm.mean.flatten(), torch.full((6,), 0.5))
    torch.testing.assert_close(model.input_norm.std.flatten(), torch.full((6,), 0.5))
    scratch = build_classifier(_cls_config(tmp_path, None, channels=5, mask=True))
    torch.testing.assert_close(scratch.input_norm.std.flatten(), torch.full((6,), 0.25))
    # The forward pass feeds the backbone exactly (x - mean) / std.
    x = torch.rand(2, 3, 6, 32, 32)
    with torch.no_grad():
        features = model.backbone(((x.flatten(0, 1) - 0.5) / 0.5))
        sequence, _ = model.rnn(features.view(2, 3, -1))
        expected = model.vertebra_out(torch.cat([sequence.mean(1), sequence.amax(1)], -1)).squeeze(-1)
        torch.testing.assert_close(model(x)["logit"], expected, rtol=1e-4, atol=1e-5)


def test_tiled_mean_std_match_timms_stem_adaptation(tmp_path) -> None:
    """A 6-channel stack made of an RGB image twice gives the adapted backbone exactly the pretrained
    3-channel backbone's features: the channel statistics follow timm's filter repetition."""
    from rsna_cspine.cls.model import InputNormalisation, create_backbone, pretrained_normalisation

    source = _save_timm_weights(tmp_path / "w.safetensors")
    adapted = create_backbone("test_resnet", 6, num_classes=0, pretrained_file=str(tmp_path / "w.safetensors")).eval()
    source.reset_classifier(0)
    cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # ImageNet's: unequal per colour
    mean6, std6 = pretrained_normalisation(cfg, 6)
    assert mean6 == [0.485, 0.456, 0.406] * 2 and std6 == [0.229, 0.224, 0.225] * 2
    rgb = torch.rand(2, 3, 48, 48)
    mean3, std3 = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source((rgb - mean3) / std3)
        got = adapted(InputNormalisation(mean6, std6)(torch.cat([rgb, rgb], 1)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # One channel: timm sums the filters, so the grey channel gets the colours' average statistics.
    assert pretrained_normalisation(cfg, 1) == ([sum(cfg["mean"]) / 3], [sum(cfg["std"]) / 3])


def test_normalisation_travels_with_the_checkpoint_not_the_weights_file(tmp_path) -> None:
    from rsna_cspine.cls.predict import load_classifiers
    from rsna_cspine.config import to_dict
    from rsna_cspine.engine import save_checkpoint

    weights = tmp_path / "w.safetensors"
    _save_timm_weights(weights)
    cfg = _cls_config(tmp_path, weights)
    trained = build_classifier(cfg).eval()
    with torch.no_grad():
        trained.input_norm.mean.fill_(0.3)  # a value no config could rebuild: only the checkpoint knows it
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=trained, epoch=1, config=to_dict(cfg))
    weights.unlink()  # prediction machines need not have the pretrained file
    (model,) = load_classifiers([checkpoint], torch.device("cpu")).models
    torch.testing.assert_close(model.input_norm.mean, trained.input_norm.mean)
    x = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)["logit"], trained(x)["logit"])
    # The config alone (no file, no checkpoint) still asks for the backbone's statistics.
    torch.testing.assert_close(build_classifier(cfg, load_pretrained=False).input_norm.std.flatten(), torch.full((3,), 0.5))


def test_checkpoints_without_a_stored_normalisation_keep_the_scratch_centring(tmp_path) -> None:
    weights = tmp_path / "w.pth"
    _save_timm_weights(weights)
    model = build_classifier(_cls_config(tmp_path, weights)).eval()  # pretrained statistics (std 0.5)
    legacy = {k: v for k, v in build_classifier(_cls_config(tmp_path, None)).state_dict().items() if not k.startswith("input_norm.")}
    model.load_state_dict(legacy)  # strict: the missing buffers are filled, not reported
    torch.testing.assert_close(model.input_norm.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(model.input_norm.std.flatten(), torch.full((3,), 0.25))


def test_weights_of_another_architecture_are_a_config_error(tmp_path) -> None:
    _save_timm_weights(tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="do not fit timm model 'test_convnext'"):
        FractureClassifier("test_convnext", 3, hidden=8, pretrained_file=str(tmp_path / "resnet.pth"))


@pytest.mark.parametrize("config", ["cls_resnet50.yaml", "cls_convnext_tiny.yaml"])
def test_gpu_configs_need_their_weights_file_and_say_how_to_get_it(tmp_path, monkeypatch, config) -> None:
    from pathlib import Path

    from rsna_cspine.cls.train import train_classifier
    from rsna_cspine.config import load_config

    monkeypatch.chdir(tmp_path)  # the configs' relative weights/ path resolves to an empty folder
    cfg = load_config(ClsConfig, REPO_ROOT / "configs" / config, [f"data.root={tmp_path / 'absent'}", "device=cpu"])
    name, expected = cfg.model.backbone, Path(cfg.model.pretrained_file)
    assert "." in name and expected.name.startswith(name) and expected.suffix == ".safetensors"
    # The data root does not exist either: failing on the weights proves the check comes before any data work.
    with pytest.raises(ConfigError, match="pretrained weights file not found") as info:
        train_classifier(cfg)
    message = str(info.value)
    assert str(expected) in message and f"timm.create_model('{name}', pretrained=True)" in message
    assert f"/kaggle/input/<dataset>/{expected.name}" in message and "models--timm--" in message
    assert not (tmp_path / "runs").exists()

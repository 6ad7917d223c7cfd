from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from rsna_cspine.config import load_config, save_config
from rsna_cspine.errors import ConfigError
from tests.paths import LEGACY_CONFIGS, REPO_ROOT


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class RunCfg:
    name: str = "run"
    epochs: int = 2
    grid: tuple[int, int, int] = (64, 64, 64)
    pretrained_file: str | None = None
    amp: bool = True
    optim: Optim = field(default_factory=Optim)


def test_defaults_then_yaml_then_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 5\ngrid: [32, 48, 64]\noptim:\n  lr: 0.01\n")
    cfg = load_config(RunCfg, yml, ["optim.betas=[0.5, 0.6]", "name=abc", "epochs=6"])
    assert cfg.epochs == 6  # the override wins over the file
    assert cfg.grid == (32, 48, 64)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.name == "abc"
    assert cfg.amp is True and cfg.pretrained_file is None
    assert load_config(RunCfg, yml).epochs == 5 and load_config(RunCfg).epochs == 2  # file over defaults
    with pytest.raises(ConfigError, match="lr_unused_is_error"):  # an override naming no field is refused
        load_config(RunCfg, yml, ["name=abc", "lr_unused_is_error=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RunCfg, None, ["epochs=7", "pretrained_file=/x/w.pth"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(RunCfg, path) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 3\n", "unknown config key"),
        ("optim:\n  momentum: 0.9\n", "optim.momentum"),
        ("grid: [1, 2]\n", "expected 3 values"),
        ("epochs: three\n", "expected int"),
        ("amp: 1\n", "true/false"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    yml = tmp_path / "bad.yaml"
    yml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(RunCfg, yml)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunCfg, None, ["epochs"])


def test_float_fields_accept_yaml_exponents_and_refuse_words(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  lr: 3e-3\n")
    assert load_config(RunCfg, yml).optim.lr == pytest.approx(0.003)
    yml.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(RunCfg, yml)


def test_typed_values_win_over_file_and_overrides_and_are_not_reparsed(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("name: from_file\nepochs: 5\n")
    odd = tmp_path / "a: b [c]"  # YAML would read this path as a mapping or a list
    cfg = load_config(RunCfg, yml, ["name=from_override", "epochs=6"], values={"name": odd, "optim": {"lr": 0.5}})
    assert cfg.name == str(odd) and cfg.epochs == 6 and cfg.optim.lr == 0.5
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(RunCfg, None, values={"nope": 1})
    yml.write_text("other: {x: 1}\nrun:\n  epochs: 9\n")
    assert load_config(RunCfg, yml, section="run").epochs == 9  # a section of a larger file




@pytest.mark.parametrize(
    "cls_path, stored, current, values",
    [
        # The shipped configs now name a prepared cache (the old ones named a cache per stage), and a
        # checkpoint from before the cascade is a whole-volume model: today's config with the cascade off,
        # no box scaled to the neck, no test-time mirroring and one window over the whole grid (it predicts as it
        # did), and validation from the start.
        ("rsna_cspine.seg.config:SegConfig", "seg_cpu.yaml", "seg_cpu.yaml",
         {"data": {"cache_dir": "work/seg_cache_64x128x128", "spacing": (), "reference_neck_mm": 0.0},
          "localiser": {"enabled": False}, "train": {"val_from": 0.0},
          "predict": {"mirror": False, "roi_size": (0, 0, 0), "overlap": 0.25, "blend": "constant", "sw_batch_size": 1}}),
        ("rsna_cspine.cls.config:ClsConfig", "cls_cpu.yaml", "cls_cpu.yaml", {"data.cache_dir": "work/crops_cpu"}),
        ("rsna_cspine.twod.config:TwoDConfig", "twod_convnext_tiny.yaml", "twod_convnext_tiny.yaml", {"fold": 2}),
    ],
)
def test_configs_stored_by_the_old_schema_translate_to_todays(cls_path, stored, current, values):
    import importlib

    import yaml

    from rsna_cspine.config import config_from_checkpoint

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    old = yaml.safe_load((LEGACY_CONFIGS / stored).read_text())
    assert config_from_checkpoint(cls, old) == load_config(cls, REPO_ROOT / "configs" / current, values=values)
    with pytest.raises(ConfigError, match="is now 'train"):  # the old keys in a YAML file or override: refused
        load_config(cls, LEGACY_CONFIGS / stored)


def test_an_old_stage2_checkpoint_still_predicts_and_a_retired_model_is_refused(tmp_path):
    import torch
    import yaml

    from rsna_cspine.cls.config import ClsConfig
    from rsna_cspine.cls.model import build_classifier
    from rsna_cspine.cls.predict import load_classifiers
    from rsna_cspine.config import config_from_checkpoint
    from rsna_cspine.engine import save_checkpoint

    old = yaml.safe_load((LEGACY_CONFIGS / "cls_cpu.yaml").read_text())
    model = build_classifier(config_from_checkpoint(ClsConfig, old), load_pretrained=False)
    ensemble = load_classifiers([save_checkpoint(tmp_path / "old.pt", model=model, epoch=3, config=old)],
                                torch.device("cpu"))
    crop = ensemble.crop_config
    assert (crop.n_slices, crop.size, crop.in_chans) == (8, 80, 11)
    stacks = torch.randint(0, 256, (2, 8, 11, 80, 80), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.sigmoid(model.eval()(stacks.float() / 255)["logit"]).numpy()
    np.testing.assert_allclose(ensemble.predict_stacks(stacks.numpy()), expected, rtol=1e-5)  # the stored weights
    boxed = {**old, "model": {**old["model"], "box_logits": True}}
    save_checkpoint(tmp_path / "boxed.pt", model=model, epoch=3, config=boxed)
    with pytest.raises(ConfigError, match=r"boxed\.pt.*model\.box_logits=True is no longer supported"):
        load_classifiers([tmp_path / "boxed.pt"], torch.device("cpu"))

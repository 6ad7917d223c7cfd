from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rsna_cspine.config import load_config, save_config
from rsna_cspine.errors import ConfigError


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
    cfg = load_config(RunCfg, yml, ["optim.betas=[0.5, 0.6]", "name=abc", "lr_unused_is_error=1"][:2])
    assert cfg.epochs == 5
    assert cfg.grid == (32, 48, 64)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.name == "abc"
    assert cfg.amp is True and cfg.pretrained_file is None


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

"""benchmarks/gpu_smoke.sh, checked without a GPU: its syntax, and that every training command it would
run names a real config and only keys that config's schema has (a moved key fails here, not on the GPU)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rsna_cspine.cls.config import ClsConfig
from rsna_cspine.config import load_config, to_dict
from rsna_cspine.prepare.config import PrepareConfig, training_config_overrides
from rsna_cspine.seg.config import SegConfig
from tests.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_smoke.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(tmp_path: Path, *flags: str) -> list[list[str]]:
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *flags],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not any((tmp_path / "out").iterdir()), "a dry run must not write anything"
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def _command(commands: list[list[str]], name: str) -> list[str]:
    (found,) = [c for c in commands if name in c]
    return found


def test_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_every_command_uses_existing_configs_and_keys(tmp_path: Path, mode: str) -> None:
    commands = _dry_run(tmp_path, *(["--cpu"] if mode == "cpu" else []))
    # One prepare decodes the training studies for both stages, before torchrun: the trainers never decode.
    prepare = _command(commands, "prepare")
    assert "torch.distributed.run" not in prepare
    assert commands.index(prepare) < commands.index(_command(commands, "train-seg"))
    rest = prepare[prepare.index("prepare") + 1 :]
    prepare_overrides = [arg for arg in rest if "=" in arg and not arg.startswith("-")]
    prepared = load_config(PrepareConfig, None, [*training_config_overrides(
        REPO_ROOT / rest[rest.index("--seg-config") + 1], REPO_ROOT / rest[rest.index("--cls-config") + 1]), *prepare_overrides])
    for name, schema in (("train-seg", SegConfig), ("train-cls", ClsConfig)):
        command = _command(commands, name)
        assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        rest = command[command.index(name) + 1 :]
        assert rest[rest.index("--cache") + 1] == prepare[prepare.index("--out") + 1]
        config = REPO_ROOT / rest[rest.index("--config") + 1]
        overrides = [arg for arg in rest if "=" in arg and not arg.startswith("-")]
        cfg = load_config(schema, config, overrides)  # raises ConfigError on an unknown key
        if name == "train-cls":
            cfg.validate()
            assert to_dict(cfg.data.crop) == to_dict(prepared.crop)  # the trainer would refuse the cache otherwise
        else:
            assert list(cfg.data.grid) == list(prepared.stage1.grid)
        amp = cfg.train.amp
        assert amp is (mode == "gpu") and cfg.device == ("cuda" if mode == "gpu" else "cpu")
    cls = load_config(ClsConfig, REPO_ROOT / "configs" / ("cls_resnet50.yaml" if mode == "gpu" else "cls_cpu.yaml"),
                      [a for a in command if a.startswith("model.")])  # fmt: skip
    weights = Path(cls.model.pretrained_file)
    assert weights.name == f"{cls.model.backbone}.safetensors"
    assert any(weights.name in " ".join(c) and "save_file" in " ".join(c) for c in commands)  # written before use
    # predict reads the second synthetic set: 4 studies, 3 of them test studies.
    predict = _command(commands, "predict")
    data = predict[predict.index("--data") + 1]
    synth = next(c for c in commands if "synth" in c and data in c)
    fraction = next(float(a.split("=", 1)[1]) for a in synth if a.startswith("test_fraction="))
    studies = int(synth[synth.index("--studies") + 1])
    assert round(studies * fraction) == 3


@pytest.mark.slow
def test_cpu_mode_trains_both_stages_under_torchrun_and_predicts(tmp_path: Path) -> None:
    """The script's CPU mode: the same torchrun commands with gloo, 2 epochs each, on small synthetic data."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)  # fmt: skip
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-5000:]
    assert "OK: both stages trained under torchrun, 3 studies predicted" in result.stdout
    assert "per-study time (s), predict on CPU" in result.stdout
    for stage in ("seg/fold0", "cls/fold0"):
        assert (out / "runs" / stage / "summary.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert "Loading pretrained weights from file" in printed  # stage 2 went through model.pretrained_file

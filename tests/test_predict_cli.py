"""``rsna-cspine predict`` and ``rsna-cspine merge`` from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_cspine.cli import main
from rsna_cspine.constants import TARGET_COLUMNS
from rsna_cspine.inference import timing_log_path
from tests.toy_pipeline import GOOD

torch.set_num_threads(1)


def _wide(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"row_id": str})
    parts = frame["row_id"].str.extract(r"^(?P<uid>.+)_(?P<target>C[1-7]|patient_overall)$")
    return frame.assign(**parts).pivot(index="uid", columns="target", values="fractured")[list(TARGET_COLUMNS)]


def test_predict_with_rule_flag_then_shards_and_merge(
    tiny_models: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "submission.csv"
    code = main(["predict", "--data", str(tiny_dataset), "--models", str(tiny_models), "--out", str(out),
                 "--rule", "max",
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    assert f"submission: {out}" in capsys.readouterr().out
    wide = _wide(out)
    good = wide.loc[GOOD]
    np.testing.assert_allclose(good["patient_overall"], good[list(TARGET_COLUMNS[:7])].max(axis=1))
    assert timing_log_path(out).is_file()

    shards = [tmp_path / f"part{i}.csv" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(["predict", "--data", str(tiny_dataset), "--models", str(tiny_models), "--out", str(shard),
                     "--shard", f"{i}/2", "--no-progress", "rule=max", "device=cpu"]) == 0  # fmt: skip
    merged = tmp_path / "merged.csv"
    assert main(["merge", *map(str, shards), "--test-csv", str(tiny_dataset / "test.csv"), "--out", str(merged)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(merged), pd.read_csv(out))

    # A missing shard: refused, nothing written, exit code 1.
    refused = tmp_path / "refused.csv"
    assert main(["merge", str(shards[0]), "--test-csv", str(tiny_dataset / "test.csv"), "--out", str(refused)]) == 1
    assert not refused.exists()


def test_typed_flags_and_overrides_go_through_one_loader(tmp_path: Path) -> None:
    import argparse

    from rsna_cspine.config import load_config
    from rsna_cspine.errors import ConfigError
    from rsna_cspine.inference import PipelineConfig
    from rsna_cspine.predict_commands import add_arguments, flag_values

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    yaml_file = tmp_path / "predict.yaml"
    yaml_file.write_text("rule: max\ncheap_folds: 2\ntime_budget_s: 100\n")
    args = parser.parse_args(["--data", "d", "--models", "m", "--out", "o", "--config", str(yaml_file),
                              "--time-budget", "30", "--tta", "--no-resume", "rule=noisy_or", "blend_weight=0.3"])
    cfg = load_config(PipelineConfig, args.config, list(args.overrides), flag_values(args))
    # defaults ← YAML ← key=value ← flags; a flag not given leaves the value below it alone.
    assert cfg.rule == "noisy_or" and cfg.cheap_folds == 2 and cfg.blend_weight == 0.3
    assert cfg.time_budget_s == 30.0 and isinstance(cfg.time_budget_s, float)
    assert cfg.tta is True and cfg.resume is False and cfg.device == "auto" and cfg.cpu_bf16 is False
    with pytest.raises(ConfigError, match="tta"):
        load_config(PipelineConfig, None, [], {"tta": "yes"})


def test_bad_arguments_exit_with_1(tiny_models: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    predict = ["predict", "--models", str(tiny_models), "--out", str(out)]
    assert main([*predict, "--data", str(tiny_dataset), "--shard", "2/2"]) == 1
    assert main([*predict, "--data", str(tmp_path)]) == 1  # no test.csv
    assert main([*predict, "--data", str(tiny_dataset), "rule=nope"]) == 1
    assert not out.exists()


def test_console_script_runs_predict_with_a_zero_time_budget(tiny_dataset: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("rsna-cspine")
    out = tmp_path / "s.csv"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [str(script), "predict", "--data", str(tiny_dataset), "--models", str(tmp_path / "none"), "--out", str(out),
         "--time-budget", "0", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(out)) == len(pd.read_csv(tiny_dataset / "test.csv"))
    timings = pd.read_csv(timing_log_path(out))
    assert timings["path"].eq("prior").all() and timings["status"].eq("budget").all()
    assert f"submission: {out}" in result.stdout

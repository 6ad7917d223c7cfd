"""torchrun (DDP, gloo on CPU): both trainers run under 2 processes, ranks stay in lock-step, and the
result tracks the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rsna_cspine.config import save_config
from tests.paths import REPO_ROOT


def _torchrun(args: list[str], tmp_path: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO_ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(REPO_ROOT / "tests" / "ddp_worker.py"), *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _assert_same_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """Parameters must be bit-identical across ranks (gradients were averaged). On CPU, BatchNorm running
    statistics are rank-local (SyncBatchNorm is GPU-only; each rank sees its own batches) and rank 0's are
    the ones checkpointed, so they only have to agree roughly: layer by layer, on average over channels
    (a single channel of a 4-stack batch can differ by a third between ranks by chance)."""
    rank0 = torch.load(out_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(out_dir / "rank1.pt", weights_only=True)
    assert rank0["parameters"].keys() == rank1["parameters"].keys()
    for name, tensor in rank0["parameters"].items():
        assert torch.equal(tensor, rank1["parameters"][name]), f"{name} differs between ranks"
    for name, tensor in rank0["buffers"].items():
        if tensor.is_floating_point():
            other = rank1["buffers"][name]
            gap = float((tensor - other).abs().mean())
            assert gap <= 0.2 * float(other.abs().mean()) + 0.02, (name, gap)
    return {**rank0["buffers"], **rank0["parameters"]}


def test_segmentation_ddp_ranks_agree_and_track_single_process(tmp_path) -> None:
    from rsna_cspine.seg.train import fit_segmentation
    from tests.toy_seg import tiny_seg_config, write_toy_cache

    cache = tmp_path / "cache"
    paths = write_toy_cache(cache, 6, seed=0)
    _torchrun(["seg", str(tmp_path / "weights"), str(cache), str(tmp_path / "ddp"), "4", "1"], tmp_path)
    ddp_weights = _assert_same_weights(tmp_path / "weights")

    checkpoint = torch.load(tmp_path / "ddp" / "fold0" / "last.pt", weights_only=False)
    for name, tensor in checkpoint["model"].items():  # rank 0 checkpointed exactly the shared weights
        assert torch.equal(tensor, ddp_weights[name])
    ddp = pd.read_csv(tmp_path / "ddp" / "fold0" / "summary.csv")
    assert ddp["epoch"].tolist() == [1, 2, 3, 4]  # one writer: no duplicated rows from rank 1

    torch.set_num_threads(1)
    single_cfg = tiny_seg_config(tmp_path / "single", epochs=4)  # 1 process × batch 2 = 2 processes × batch 1
    single = pd.read_csv(fit_segmentation(single_cfg, paths[:4], paths[4:], progress=False) / "summary.csv")
    assert ddp["train_loss"].iloc[-1] < 0.8 * ddp["train_loss"].iloc[0]
    relative_gap = (ddp["train_loss"] - single["train_loss"]).abs() / single["train_loss"]
    assert relative_gap.max() < 0.25, pd.DataFrame({"ddp": ddp["train_loss"], "single": single["train_loss"]})


def test_classifier_cli_runs_unchanged_under_torchrun_and_resumes(tmp_path) -> None:
    from tests.toy_cls import tiny_cls_config, toy_crop_dataset

    root, cache = toy_crop_dataset(tmp_path)
    cfg = tiny_cls_config(tmp_path, root, cache, "ddp_run", epochs=2)
    cfg.train.batch_size = 4  # per process
    config_path = save_config(cfg, tmp_path / "cls.yaml")
    _torchrun(["cls", str(tmp_path / "weights"), "train-cls", "--config", str(config_path)], tmp_path)
    _assert_same_weights(tmp_path / "weights")
    fold_dir = Path(cfg.run_dir) / "fold0"
    summary = pd.read_csv(fold_dir / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2]  # one writer: no duplicated rows from rank 1
    assert (Path(cfg.run_dir) / "oof_fold0.csv").is_file()

    _torchrun(["cls", str(tmp_path / "weights2"), "train-cls", "--config", str(config_path), "--resume", "train.epochs=3"],
              tmp_path)
    resumed = _assert_same_weights(tmp_path / "weights2")
    summary = pd.read_csv(fold_dir / "summary.csv")
    assert summary["epoch"].tolist() == [1, 2, 3]
    last = torch.load(fold_dir / "last.pt", weights_only=False)
    assert last["epoch"] == 3
    assert yaml.safe_load((fold_dir / "config.yaml").read_text())["train"]["epochs"] == 3
    for name, tensor in last["model"].items():
        assert torch.equal(tensor, resumed[name])


@pytest.mark.skipif(not hasattr(torch.distributed, "is_available") or not torch.distributed.is_available(),
                    reason="torch built without distributed support")
def test_gloo_is_available_on_cpu() -> None:
    assert torch.distributed.is_gloo_available()

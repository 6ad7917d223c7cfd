"""Launched by tests/test_ddp.py under torchrun: trains one stage, then each rank saves its final weights.

The trainers are used unchanged; the only addition is a wrapper around the training loop's ``wrap_model``
call that keeps a reference to the DDP model, so that every rank (not only rank 0, which writes
checkpoints) can dump the weights it ended with for the test to compare.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch


def main() -> int:
    stage, out_dir, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    train_module = importlib.import_module(f"rsna_cspine.{stage}.train")
    loop_module = importlib.import_module("rsna_cspine.training.loop")
    captured: list = []
    original = loop_module.wrap_model

    def keep_reference(model, ctx, device):
        wrapped = original(model, ctx, device)
        captured.append((wrapped, ctx.rank, ctx.world_size))
        return wrapped

    loop_module.wrap_model = keep_reference
    if stage == "seg":
        from rsna_cspine.engine import cleanup_distributed, init_distributed
        from tests.toy_seg import tiny_seg_config

        cache_dir, run_dir, epochs, batch = Path(rest[0]), rest[1], int(rest[2]), int(rest[3])
        paths = sorted(cache_dir.glob("*.npz"))
        cfg = tiny_seg_config(Path(run_dir), epochs=epochs)
        cfg.train.batch_size = batch
        device = torch.device("cpu")
        ctx = init_distributed(device)
        train_module.fit_segmentation(cfg, paths[:4], paths[4:], progress=False, ctx=ctx, device=device)
        _dump(captured, Path(out_dir))
        cleanup_distributed(ctx)
        return 0
    from rsna_cspine.cli import main as cli_main

    status = cli_main(rest)
    _dump(captured, Path(out_dir))
    return status


def _dump(captured: list, out_dir: Path) -> None:
    model, rank, world_size = captured[-1]
    from rsna_cspine.engine import unwrap_model

    assert world_size == 2, f"expected a 2-process group, got world_size={world_size}"
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = unwrap_model(model)
    state = {
        "parameters": {n: p.detach().clone() for n, p in module.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
    }
    torch.save(state, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())

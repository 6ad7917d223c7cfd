from __future__ import annotations

import csv
import random

import numpy as np
import pytest
import torch

from rsna_cspine.engine import (
    training_autocast,
    EarlyStopping,
    SummaryLog,
    TimeBudget,
    all_reduce_mean,
    amp_dtype,
    any_rank,
    autocast,
    barrier,
    fold_of,
    fold_run_dir,
    init_distributed,
    load_checkpoint,
    make_grad_scaler,
    make_model_ema,
    save_checkpoint,
    seed_everything,
)
from rsna_cspine.errors import CSpineError


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


@pytest.mark.parametrize("seed", [0, 7, 42, 2**31 - 1, 2**32 - 1])
def test_seeding_through_monai_gives_the_streams_of_the_three_seed_calls(seed: int, monkeypatch) -> None:
    """seed_everything (MONAI set_determinism) against python, numpy and torch seeded one by one."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    def draw() -> tuple:
        return random.random(), np.random.random(4).tolist(), torch.rand(4).tolist(), torch.randint(0, 10**9, (3,)).tolist()

    expected = draw()
    random.seed(seed + 1), np.random.seed((seed + 1) % 2**32), torch.manual_seed(seed + 1)  # move every stream away
    seed_everything(seed)
    assert draw() == expected
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False


def test_checkpoint_resume_continues_identically(tmp_path):
    seed_everything(3)
    model, opt, sched = _model_and_optimizer()
    _step(model, opt, sched)
    save_checkpoint(tmp_path / "last.pt", model=model, optimizer=opt, scheduler=sched, epoch=1, best_score=0.5)
    _step(model, opt, sched)  # the uninterrupted run's second step (consumes RNG after the save)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = _model_and_optimizer()
    torch.manual_seed(999)  # a resumed process starts with unrelated RNG state
    state = load_checkpoint(
        tmp_path / "last.pt", model=model2, optimizer=opt2, scheduler=sched2, restore_rng=True
    )
    assert state["epoch"] == 1 and state["best_score"] == 0.5
    assert sched2.get_last_lr() == pytest.approx([5e-3])
    _step(model2, opt2, sched2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CSpineError, match="broken.pt"):
        load_checkpoint(bad)
    with pytest.raises(CSpineError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_summary_log_truncates_on_resume(tmp_path):
    log = SummaryLog(tmp_path)
    for epoch in range(1, 4):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch, "val_dice": 0.2 * epoch})
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resumed = SummaryLog(tmp_path, resume_epoch=2)
    resumed.append({"epoch": 3, "train_loss": 0.1, "val_dice": 0.9})
    with (tmp_path / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["val_dice"]) == pytest.approx(0.9)


def test_early_stopping_counts_bad_epochs():
    stopper = EarlyStopping(patience=2, mode="min")
    assert stopper.step(1.0)
    assert stopper.step(0.5)
    assert not stopper.step(0.6)
    assert not stopper.should_stop
    assert not stopper.step(0.7)
    assert stopper.should_stop
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 0.5 and restored.should_stop


def test_time_budget_fits_the_cosine_schedule_to_the_epochs_that_fit():
    from timm.scheduler import CosineLRScheduler

    budget = TimeBudget(epochs=100, budget_s=60.0)
    assert budget.position(3.0) == 3.0  # nothing measured yet: the configured schedule
    # 10 s per epoch, 12 s of the budget spent (2 s of preparation): 1 + 48 / 10 epochs fit.
    budget.update(epochs_done=1, train_s=10.0, spent_s=12.0, last_epoch_s=10.0)
    assert budget.planned == pytest.approx(5.8)
    assert budget.position(2.9) == pytest.approx(50.0)
    assert budget.position(5.8) == pytest.approx(100.0) and budget.position(9.0) == 100.0
    assert budget.next_epoch_fits(50.0) and not budget.next_epoch_fits(50.5)

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1e-2)
    cosine = CosineLRScheduler(optimizer, t_initial=100, lr_min=1e-4)
    cosine.step(budget.position(5.8))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the floor when the budget ends
    cosine.step(budget.position(2.9))
    assert optimizer.param_groups[0]["lr"] == pytest.approx((1e-2 + 1e-4) / 2)  # half-way in time

    restored = TimeBudget(epochs=100, budget_s=60.0)
    restored.load_state_dict(budget.state_dict())
    assert restored.planned == budget.planned and restored.longest_epoch_s == 10.0
    # A budget longer than the configured epochs never stretches the schedule.
    roomy = TimeBudget(epochs=4, budget_s=1e6)
    roomy.update(epochs_done=1, train_s=1.0, spent_s=1.0, last_epoch_s=1.0)
    assert roomy.planned == 4 and roomy.position(2.0) == 2.0


def test_without_a_budget_the_schedule_and_the_stop_rule_are_untouched():
    budget = TimeBudget(epochs=10, budget_s=0.0)
    budget.update(epochs_done=3, train_s=1e9, spent_s=1e9, last_epoch_s=1e9)
    assert budget.position(7.5) == 7.5 and budget.next_epoch_fits(1e12)


def test_fold_of_is_a_deterministic_group_split():
    studies = [f"1.2.3.{i}" for i in range(50)] * 2  # every study twice: one fold each still
    folds = fold_of(studies, n_folds=5, seed=7)
    assert set(folds) == set(studies)
    counts = np.bincount(list(folds.values()), minlength=5)
    assert counts.tolist() == [10] * 5
    assert fold_of(studies, 5, seed=7) == folds
    assert fold_of(studies, 5, seed=8) != folds


def test_model_ema_averages_the_weights_and_is_off_at_zero_decay():
    assert make_model_ema(torch.nn.Linear(2, 1), 0.0) is None
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_model_ema(model, 0.99)
    ema.update(model, step=1)  # the first update copies the weights (zeros)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(2, 7):  # a short run: the warmed-up decay keeps part of the earlier weights
        ema.update(model, step=step)
    averaged = float(ema.module.weight[0, 0].detach())
    assert 0.5 < averaged < 0.99
    assert float(model.weight[0, 0].detach()) == 1.0


@pytest.mark.parametrize(
    "capability, expected",
    [((6, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_amp_dtype_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    # P100 (6.0) and T4 (7.5) report bf16 as "supported" (emulated): the capability must decide, not that answer.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    cuda = torch.device("cuda", 0)
    assert amp_dtype(cuda) == expected
    # float16 trains with an active GradScaler; bfloat16 needs none; amp off needs none either.
    assert make_grad_scaler(cuda, enabled=True).is_enabled() == (expected == torch.float16)
    assert not make_grad_scaler(cuda, enabled=False).is_enabled()


def test_amp_dtype_on_cpu_is_full_precision_unless_bf16_is_asked_for():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu) is None and amp_dtype(cpu, cpu_bf16=True) == torch.bfloat16
    assert not make_grad_scaler(cpu, enabled=True).is_enabled()
    a, b = torch.rand(4, 8), torch.rand(8, 3)
    with autocast(cpu, enabled=True):
        assert torch.mm(a, b).dtype == torch.float32
    with autocast(cpu, enabled=True, cpu_bf16=True):
        assert torch.mm(a, b).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_training_amp_on_cpu_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    import rsna_cspine.engine.devices as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    a, b = torch.rand(4, 8), torch.rand(8, 3)
    with training_autocast(cpu, enabled=True):
        assert torch.mm(a, b).dtype == (torch.bfloat16 if native else torch.float32)
    with training_autocast(cpu, enabled=False):
        assert torch.mm(a, b).dtype == torch.float32
    assert not make_grad_scaler(cpu, enabled=True).is_enabled()  # bfloat16 needs no loss scaling


def test_a_gpu_job_reduces_its_own_numbers_through_gloo(monkeypatch):
    """A CUDA training device without a GPU: record the backend the group is created with and the device of
    every tensor the project's collectives reduce; each must be served by the backend named for its device."""
    import torch.distributed as dist

    created: dict[str, object] = {}
    reduced: list[torch.Tensor] = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        reduced.append(tensor)
        if op == dist.ReduceOp.SUM:  # the other rank holds the same numbers
            tensor.mul_(2)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: created.setdefault("cuda_device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: created.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)

    ctx = init_distributed(torch.device("cuda", 1))
    assert created == {"cuda_device": 1, "backend": "cpu:gloo,cuda:nccl"} and ctx.backend == created["backend"]
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 1)
    assert all_reduce_mean(3.5, ctx) == 3.5
    assert any_rank(True, ctx) and not any_rank(False, ctx)
    barrier(ctx)
    backend_of = dict(part.split(":") for part in str(created["backend"]).split(","))
    assert len(reduced) == 4
    assert all(backend_of[t.device.type] == "gloo" for t in reduced), [t.device for t in reduced]

    created.clear()
    init_distributed(torch.device("cpu"))
    assert created == {"backend": "gloo"}  # a CPU job: gloo alone


def test_fold_run_dir_is_the_one_rule_for_every_stage(tmp_path):
    assert fold_run_dir(tmp_path, 3) == tmp_path / "fold3"
    assert fold_run_dir(tmp_path, -1) == tmp_path / "all"
    assert fold_run_dir(tmp_path, None) == tmp_path


def test_a_training_call_on_one_thread_gives_the_caller_its_threads_back():
    # The demo trains stage 2 on one torch thread and then predicts in the same process on all of them.
    from rsna_cspine.engine.devices import torch_threads
    from rsna_cspine.engine.distributed import run_seeded_distributed

    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    seen = run_seeded_distributed(lambda device, ctx: torch.get_num_threads(), device="cpu", seed=0, threads=wanted)
    assert seen == wanted and torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(wanted):
            assert torch.get_num_threads() == wanted
            raise RuntimeError("a failed run")
    assert torch.get_num_threads() == before

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from rsna_cspine.engine import (
    EarlyStopping,
    SummaryLog,
    TimeBudget,
    WeightedEpochSampler,
    fold_of,
    load_checkpoint,
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


def test_weighted_epoch_sampler_follows_the_weights_and_splits_one_draw_over_ranks():
    weights = np.array([3.0, 1.0, 1.0, 1.0, 0.0])
    whole = list(WeightedEpochSampler(weights, 6000, torch.Generator().manual_seed(7)))
    counts = np.bincount(whole, minlength=5)
    assert len(whole) == 6000 and counts[4] == 0
    assert counts[0] / counts[1:4].mean() == pytest.approx(3.0, rel=0.1)
    again = list(WeightedEpochSampler(weights, 6000, torch.Generator().manual_seed(7)))
    assert again == whole  # the epoch's generator alone fixes the draw (resume repeats it)
    ranks = [list(WeightedEpochSampler(weights, 6001, torch.Generator().manual_seed(7), rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3000
    assert ranks[0] + ranks[1] != whole and sorted(ranks[0] + ranks[1]) == sorted(whole)
    with pytest.raises(ValueError):
        WeightedEpochSampler(np.zeros(3), 10, torch.Generator())


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

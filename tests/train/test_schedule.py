"""Our OneCycle against torch's OneCycleLR, step for step, and the triangle against its formula."""

import numpy as np
import pytest
import torch

from core.train.schedule import OneCycle, one_cycle_for_recipe, trace

CONFIGS = [
    dict(max_lr=0.4, total_steps=100),
    dict(max_lr=0.4, total_steps=97, pct_start=0.2, anneal_strategy="linear", div_factor=100, final_div_factor=1.0),
    dict(max_lr=0.01, total_steps=50, three_phase=True),
    dict(max_lr=0.01, total_steps=61, three_phase=True, anneal_strategy="linear", div_factor=10, final_div_factor=3),
    dict(max_lr=[0.1, 0.02], total_steps=40, base_momentum=0.8, max_momentum=0.9),
    dict(max_lr=0.05, total_steps=30, cycle_momentum=False),
]


def optimizer(kind, groups=1):
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    return torch.optim.Adam(params, lr=0.1)


def momentum_of(group):
    return group["betas"][0] if "betas" in group else group["momentum"]


def close(a, b):
    return abs(a - b) <= 1e-9 * max(abs(b), 1e-30)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_one_cycle_matches_torch_at_every_step(kind, cfg):
    groups = len(cfg["max_lr"]) if isinstance(cfg["max_lr"], list) else 1
    ours_opt, torch_opt = optimizer(kind, groups), optimizer(kind, groups)
    ours = OneCycle(ours_opt, **cfg)
    theirs = torch.optim.lr_scheduler.OneCycleLR(torch_opt, **cfg)
    for step in range(cfg["total_steps"] + 1):
        for g_ours, g_theirs in zip(ours_opt.param_groups, torch_opt.param_groups):
            assert close(g_ours["lr"], g_theirs["lr"]), (step, g_ours["lr"], g_theirs["lr"])
            assert close(momentum_of(g_ours), momentum_of(g_theirs)), step
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-9)
        if step < cfg["total_steps"]:
            ours_opt.step(), torch_opt.step()
            ours.step(), theirs.step()


def test_stepping_past_the_end_raises_like_torch():
    opt = optimizer("sgd")
    sched = OneCycle(opt, max_lr=0.1, total_steps=5)
    for _ in range(5):
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 6 times"):
        sched.step()


def test_state_dict_round_trip_restores_the_position():
    opt = optimizer("sgd")
    sched = OneCycle(opt, max_lr=0.1, total_steps=20)
    for _ in range(7):
        sched.step()
    other_opt = optimizer("sgd")
    other = OneCycle(other_opt, max_lr=0.1, total_steps=20)
    other.load_state_dict(sched.state_dict())
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert other_opt.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"]


def test_recipe_schedule_peaks_at_max_at_epoch_and_ends_at_lr_min():
    opt = optimizer("sgd")
    sched = one_cycle_for_recipe(opt, lr_max=0.4, lr_min=0.004, epochs=24, steps_per_epoch=98, max_at_epoch=5)
    lrs = [sched.values_at(s)[0][0] for s in range(24 * 98)]
    assert lrs[0] == pytest.approx(0.004)
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 5 * 98 - 1
    assert lrs[-1] == pytest.approx(0.004)
    assert lrs[100] - lrs[99] == pytest.approx(lrs[200] - lrs[199]), "linear warm-up"


def test_recipe_schedule_without_momentum_cycling_keeps_the_optimizers_momentum():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, nesterov=True)
    sched = one_cycle_for_recipe(opt, lr_max=0.4, lr_min=0.0004, epochs=4, steps_per_epoch=10, max_at_epoch=1,
                                 cycle_momentum=False)
    lrs, moms = trace(sched, sched.total_steps)
    assert max(lrs) == pytest.approx(0.4) and lrs[-1] == pytest.approx(0.0004)
    assert set(moms) == {0.9}


def test_recipe_schedule_runs_each_group_at_its_lr_scale():
    """A bias group with lr_scale 64 follows the same cycle at 64x, step for step."""
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 1.0},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 64.0}]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    sched = one_cycle_for_recipe(opt, lr_max=0.4, lr_min=0.0004, epochs=4, steps_per_epoch=10, max_at_epoch=1,
                                 cycle_momentum=False)
    ref_opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(2)], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=[0.4, 0.4 * 64], total_steps=40, pct_start=0.25,
                                              anneal_strategy="linear", div_factor=1000, final_div_factor=1.0,
                                              cycle_momentum=False)
    for _ in range(39):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups], rel=1e-9)
        assert opt.param_groups[1]["lr"] == pytest.approx(64 * opt.param_groups[0]["lr"], rel=1e-12)
        ref_opt.step()
        ref.step()
        sched.step()


@pytest.mark.parametrize("pct_start, total_steps", [(1 / 3, 3), (0.5, 2), (1 / 24, 24)])
def test_a_warm_up_of_one_step_starts_at_the_peak(pct_start, total_steps):
    """pct_start * total_steps == 1 leaves the warm-up no length, where torch divides by zero; the
    phase is then already at its end value, as it is at the last step of a longer warm-up."""
    with pytest.raises(ZeroDivisionError):
        torch.optim.lr_scheduler.OneCycleLR(optimizer("sgd"), max_lr=0.4, total_steps=total_steps,
                                            pct_start=pct_start, anneal_strategy="linear")
    schedule = OneCycle(optimizer("sgd"), max_lr=0.4, total_steps=total_steps, pct_start=pct_start,
                        anneal_strategy="linear", div_factor=10, final_div_factor=1.0)
    lrs, moms = trace(schedule, total_steps)
    assert lrs[0] == 0.4 and moms[0] == 0.85
    assert lrs[-1] == pytest.approx(0.04) and moms[-1] == pytest.approx(0.95)
    assert all(a > b for a, b in zip(lrs, lrs[1:])), "then it anneals, step by step"


def test_airbench_triangle_follows_its_formula_at_every_step():
    """--lr-end: linear from lr_min up to lr_max at the peak step, then linear down to lr_end,
    the knots placed as the assignments' one-cycle places them (the peak at step pct * total - 1)."""
    opt = optimizer("sgd")
    epochs, steps_per_epoch, peak_epoch = 8, 48, 8 * 5 / 24
    sched = one_cycle_for_recipe(opt, lr_max=1.5, lr_min=0.3, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                 max_at_epoch=peak_epoch, cycle_momentum=False, lr_end=0.105)
    total = epochs * steps_per_epoch
    knots = [0, peak_epoch / epochs * total - 1, total - 1]
    expected = np.interp(np.arange(total), knots, [0.3, 1.5, 0.105])
    lrs, _ = trace(sched, total)
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def test_a_group_with_train_steps_trains_at_lr_zero_from_then_on():
    """The frozen group's weight stops moving at its step N (momentum and decay included) while
    the other group's goes on."""
    live, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [live], "lr_scale": 1.0}, {"params": [frozen], "lr_scale": 1.0, "train_steps": 4}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    sched = one_cycle_for_recipe(opt, lr_max=0.4, lr_min=0.04, epochs=2, steps_per_epoch=5, max_at_epoch=1)
    values = []
    for step in range(10):
        assert (opt.param_groups[1]["lr"] == 0.0) == (step >= 4)
        assert opt.param_groups[0]["lr"] > 0
        (live.sum() + frozen.sum()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        values.append((live.detach().clone(), frozen.detach().clone()))
    assert all(torch.equal(values[3][1], f) for _, f in values[4:])
    assert not torch.equal(values[3][0], values[-1][0])
    assert not torch.equal(values[2][1], values[3][1])

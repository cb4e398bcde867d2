"""Cyclic must give the same LR and momentum (or Adam beta1) as torch's CyclicLR at every step."""

import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR

from core.train.schedule import Cyclic

STEPS = 61  # several full cycles for every step-size pair below


def make_optimizer(kind):
    """Two param groups, so the per-group lists are exercised."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]},
              {"params": [torch.nn.Parameter(torch.zeros(3))]}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.Adam(groups, lr=0.1, betas=(0.9, 0.999))


def momentum_of(group):
    return group["betas"][0] if "betas" in group else group["momentum"]


def assert_close(ours, theirs):
    assert abs(ours - theirs) <= 1e-9 * abs(theirs), (ours, theirs)


def schedule_pair(kind, **kwargs):
    ours_opt, torch_opt = make_optimizer(kind), make_optimizer(kind)
    return ours_opt, Cyclic(ours_opt, **kwargs), torch_opt, CyclicLR(torch_opt, **kwargs)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0),
                                        ("exp_range", 0.97)])
@pytest.mark.parametrize("step_size_up,step_size_down", [(5, None), (4, 7), (6, 1)])
def test_matches_torch_every_step(kind, mode, gamma, step_size_up, step_size_down):
    kwargs = dict(base_lr=[0.01, 0.002], max_lr=[0.1, 0.05], step_size_up=step_size_up,
                  step_size_down=step_size_down, mode=mode, gamma=gamma,
                  base_momentum=[0.8, 0.85], max_momentum=[0.9, 0.95])
    ours_opt, ours, torch_opt, theirs = schedule_pair(kind, **kwargs)
    seen_lrs = set()
    for step in range(STEPS):
        if step:
            torch_opt.step()  # keeps torch from warning about the call order
            theirs.step()
            ours.step()
        for a, b in zip(ours.get_last_lr(), theirs.get_last_lr()):
            assert_close(a, b)
        for g_ours, g_torch in zip(ours_opt.param_groups, torch_opt.param_groups):
            assert_close(g_ours["lr"], g_torch["lr"])
            assert_close(momentum_of(g_ours), momentum_of(g_torch))
            if kind == "adam":
                assert g_ours["betas"][1] == g_torch["betas"][1]
        seen_lrs.add(round(ours_opt.param_groups[0]["lr"], 12))
    assert len(seen_lrs) > step_size_up  # the schedule really moved through the cycles


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_construction_writes_what_torch_writes(kind):
    kwargs = dict(base_lr=0.01, max_lr=0.1, step_size_up=3)
    ours_opt, _, torch_opt, _ = schedule_pair(kind, **kwargs)
    for g_ours, g_torch in zip(ours_opt.param_groups, torch_opt.param_groups):
        assert set(g_ours) == set(g_torch)
        for key in ("lr", "initial_lr", "base_momentum", "max_momentum"):
            assert g_ours[key] == g_torch[key]
        assert momentum_of(g_ours) == momentum_of(g_torch) == 0.9


def test_no_momentum_cycling_leaves_momentum_alone():
    opt = make_optimizer("sgd")
    sched = Cyclic(opt, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=False)
    for _ in range(5):
        sched.step()
        assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert "max_momentum" not in opt.param_groups[0]


def test_values_at_and_state_dict_round_trip():
    opt = make_optimizer("sgd")
    sched = Cyclic(opt, base_lr=0.01, max_lr=0.1, step_size_up=4, mode="triangular2")
    for _ in range(13):
        sched.step()
    lrs, moms = sched.values_at(13)
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert [g["momentum"] for g in opt.param_groups] == moms

    resumed = Cyclic(make_optimizer("sgd"), base_lr=0.01, max_lr=0.1, step_size_up=4,
                     mode="triangular2")
    resumed.load_state_dict(sched.state_dict())
    assert resumed.get_last_lr() == sched.get_last_lr()
    sched.step()
    resumed.step()
    assert resumed.get_last_lr() == sched.get_last_lr()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        Cyclic(make_optimizer("sgd"), 0.01, 0.1, mode="sine")
    with pytest.raises(ValueError, match="param groups"):
        Cyclic(make_optimizer("sgd"), [0.01], 0.1)
    adagrad = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="momentum"):
        Cyclic(adagrad, 0.01, 0.1)

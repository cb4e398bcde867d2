"""The LR range test: its LR sweep, smoothing, divergence stop, exact restore, and suggestions."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from core.train.engine import train_step
from core.train.lr_finder import (
    DEFAULT_READING,
    METHODS,
    lr_schedule,
    range_test,
    smooth_losses,
    suggest,
    suggest_bounds,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the LR sweep and smoothing


# The ranges below are ones where the plain formula rounds the last LR to 0.9999999999999999.


def test_exp_schedule_is_geometric_and_hits_both_ends():
    lrs = lr_schedule(1e-5, 1.0, 100, "exp")
    assert len(lrs) == 100
    assert lrs[0] == 1e-5 and lrs[-1] == 1.0
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, (1.0 / 1e-5) ** (1 / 99), rtol=1e-12)


def test_linear_schedule_is_even_and_hits_both_ends():
    lrs = lr_schedule(1e-7, 1.0, 50, "linear")
    assert len(lrs) == 50
    assert lrs[0] == 1e-7 and lrs[-1] == 1.0
    np.testing.assert_allclose(np.diff(lrs), (1.0 - 1e-7) / 49, rtol=1e-12)


@pytest.mark.parametrize("args", [(0.0, 1.0, 10, "exp"), (1.0, 0.1, 10, "exp"),
                                  (1e-3, 1.0, 1, "exp"), (1e-3, 1.0, 10, "cos")])
def test_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        lr_schedule(*args)


def numpy_debiased_ema(raw, beta):
    """Closed form: a weighted mean of the losses so far, weights (1-beta)*beta**age, normalised."""
    raw = np.asarray(raw, dtype=float)
    out = []
    for i in range(len(raw)):
        weights = (1 - beta) * beta ** np.arange(i, -1, -1)
        out.append(weights @ raw[:i + 1] / (1 - beta ** (i + 1)))
    return np.array(out)


@pytest.mark.parametrize("beta", [0.0, 0.6, 0.98])
def test_smoothing_is_the_debiased_ema(beta):
    raw = np.random.default_rng(0).uniform(0.5, 3.0, size=50)
    np.testing.assert_allclose(smooth_losses(raw, beta), numpy_debiased_ema(raw, beta),
                               rtol=1e-12)
    assert smooth_losses([2.5], beta) == [pytest.approx(2.5)]  # debiased: no pull towards 0


# ---------------------------------------------------------------- a tiny net and scripted losses


class TinyNet(nn.Module):
    """Conv + BN + dropout + linear: BN buffers and dropout's RNG use are what restore must undo."""

    def __init__(self, dropout=0.2):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def batches(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 6, 6, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def scripted_loss(values):
    """A loss_fn whose value at each call is the next of ``values`` (and still backpropagates)."""
    values = iter(values)

    def loss_fn(logits, y):
        return logits.sum() * 0 + next(values)
    return loss_fn


def sweep(loss_fn, num_iter, **kwargs):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return range_test(model, opt, loss_fn, batches(3), num_iter=num_iter, device=CPU, **kwargs)


def test_range_test_smooths_the_raw_losses():
    raw = [2.3, 2.2, 2.25, 2.0, 1.7, 1.5, 1.6, 1.2]
    result = sweep(scripted_loss(raw), len(raw), smooth=0.7)
    assert result.raw_losses == pytest.approx(raw)  # float32 losses: equal to ~1e-7
    np.testing.assert_allclose(result.losses, numpy_debiased_ema(result.raw_losses, 0.7),
                               rtol=1e-12)
    assert result.lrs == lr_schedule(1e-7, 10, len(raw), "exp")
    assert result.diverged_at is None and result.loss_kind == "train"


def test_stops_when_the_smoothed_loss_passes_diverge_times_the_best():
    raw = [3.0, 2.0, 1.0, 1.5, 4.9, 5.1, 1.0, 1.0, 1.0, 1.0]
    result = sweep(scripted_loss(raw), len(raw), smooth=0.0, diverge=5.0)
    assert result.diverged_at == 5  # 5.1 > 5 * 1.0; 4.9 was not
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) == 6
    assert result.raw_losses[-1] == pytest.approx(5.1)  # the blow-up itself is kept for the plot


def test_stops_on_a_non_finite_loss():
    result = sweep(scripted_loss([2.0, 1.5, math.nan, 1.0, 1.0]), 5, smooth=0.5)
    assert result.diverged_at == 2 and len(result.losses) == 3


def test_a_real_divergence_stops_the_sweep():
    """Fitting w*x to targets 2x and 4x in turn: each step multiplies w's error by |1 - 2 lr|,
    so past lr = 1 it grows without bound, and the sweep must stop there. (The two targets keep
    the best loss above 0, so 'diverge times the best' means something.)"""
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(8, 1)
    result = range_test(model, opt, nn.MSELoss(), [(x, 2 * x), (x, 4 * x)], start_lr=1e-3,
                        end_lr=1e3, num_iter=120, device=CPU)
    assert result.diverged_at is not None and result.diverged_at < 119
    assert result.lrs[-1] > 1
    assert result.losses[-1] > 5 * min(result.losses)


def test_cycles_a_reiterable_when_num_iter_exceeds_one_pass():
    class Loader:
        """Like a DataLoader: every __iter__ starts a new epoch over the same batches."""

        def __init__(self, data):
            self.data, self.epochs = data, 0

        def __iter__(self):
            self.epochs += 1
            return iter(self.data)

    data = batches(3)
    loader = Loader(data)
    seen = []

    def loss_fn(logits, y):
        seen.append(y)
        return nn.functional.cross_entropy(logits, y)

    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    range_test(model, opt, loss_fn, loader, num_iter=8, end_lr=1e-2, device=CPU)
    assert loader.epochs == 3
    order = [next(k for k, (_, y) in enumerate(data) if y is s) for s in seen]
    assert order == [0, 1, 2, 0, 1, 2, 0, 1]


def test_empty_batches_raise_instead_of_looping_forever():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="train_batches"):
        range_test(model, opt, nn.CrossEntropyLoss(), [], num_iter=5, device=CPU)
    with pytest.raises(ValueError, match="val_batches"):
        range_test(model, opt, nn.CrossEntropyLoss(), batches(1), num_iter=5, val_batches=[],
                   device=CPU)


def test_every_param_group_trains_at_the_scheduled_lr():
    model = TinyNet()
    opt = torch.optim.SGD([{"params": model.conv.parameters(), "lr": 0.5},
                           {"params": list(model.bn.parameters()) + list(model.fc.parameters())}],
                          lr=0.1, momentum=0.9)
    used = []

    def loss_fn(logits, y):
        used.append([g["lr"] for g in opt.param_groups])
        return nn.functional.cross_entropy(logits, y)

    result = range_test(model, opt, loss_fn, batches(2), num_iter=6, device=CPU)
    assert result.lrs == lr_schedule(1e-7, 10, 6, "exp")
    assert used == [[lr, lr] for lr in result.lrs]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]


def test_validation_mode_records_the_mean_val_loss_after_each_step():
    """Replays the sweep by hand: train a step, then the size-weighted eval-mode loss on val."""
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train, val = batches(2), batches(2, seed=1) + batches(1, size=3, seed=2)
    loss_fn = nn.CrossEntropyLoss()
    replay_model = copy.deepcopy(model)
    replay_opt = torch.optim.SGD(replay_model.parameters(), lr=0.1, momentum=0.9)

    result = range_test(model, opt, loss_fn, train, num_iter=5, start_lr=1e-3, end_lr=1.0,
                        val_batches=val, device=CPU)

    expected = []
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i, lr in enumerate(result.lrs):
        replay_opt.param_groups[0]["lr"] = lr
        replay_model.train()
        train_step(replay_model, replay_opt, loss_fn, *train[i % 2], CPU, None, scaler)
        replay_model.eval()
        with torch.no_grad():
            total = sum(loss_fn(replay_model(x), y) * len(y) for x, y in val)
        expected.append((total / sum(len(y) for _, y in val)).item())
    assert result.loss_kind == "val"
    np.testing.assert_allclose(result.raw_losses, expected, rtol=1e-5)
    assert model.training  # val mode switched back


# ---------------------------------------------------------------- restoring everything exactly


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.85, 0.99), weight_decay=1e-4)


def assert_same(a, b):
    """Nested dicts/lists of tensors and plain values are identical, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_restores_model_optimizer_scaler_and_rng_bit_for_bit(kind, amp_dtype):
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_optimizer(kind, model)
    data = batches(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:  # momentum buffers / Adam moments and BN stats that the test must keep
        train_step(model, opt, loss_fn, x, y, CPU, amp_dtype, scaler)
    model.drop.eval()  # a mixed train/eval model: the flags must come back per module
    opt.param_groups[0]["lr"] = 0.0123
    before = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                            "scaler": scaler.state_dict()})
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    weights_seen = []

    def watching_loss(logits, y):
        weights_seen.append(model.conv.weight.detach().clone())
        return loss_fn(logits, y)

    result = range_test(model, opt, watching_loss, data, start_lr=1e-4, end_lr=1.0,
                        num_iter=7, device=CPU, amp_dtype=amp_dtype, scaler=scaler)

    assert len(result.lrs) == 7 and not torch.equal(weights_seen[0], weights_seen[-1])
    assert scaler.get_scale() == before["scaler"]["scale"]
    assert_same(model.state_dict(), before["model"])  # includes BN running stats + num_batches
    assert_same(opt.state_dict(), before["opt"])  # momentum buffers, moments, step, lr, betas
    assert_same([p.grad for p in model.parameters()], grads)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert opt.param_groups[0]["lr"] == 0.0123


def test_restores_even_when_the_sweep_raises():
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    before = copy.deepcopy(model.state_dict())

    def failing_loss(logits, y, calls=[]):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return nn.functional.cross_entropy(logits, y)

    with pytest.raises(RuntimeError):
        range_test(model, opt, failing_loss, batches(2), num_iter=5, device=CPU)
    assert_same(model.state_dict(), before)
    assert opt.state_dict()["state"] == {}


# ---------------------------------------------------------------- reading the curve

GRID = np.linspace(-6.0, 1.0, 141)  # log10(lr), 0.05 decade apart
LRS = 10.0 ** GRID


def sigmoid_curve(center=-3.0, width=0.4, blowup_at=0.3):
    """Falls by 1.5 around ``center`` (steepest exactly there), then shoots up past blowup_at."""
    fall = 1.5 / (1 + np.exp(-(GRID - center) / width))
    return 2.3 - fall + np.exp(6 * (GRID - blowup_at))


def test_steepest_finds_the_steepest_point():
    lr = suggest(LRS, sigmoid_curve(), "steepest")
    assert math.log10(lr) == pytest.approx(-3.0, abs=0.051)


def test_steepest_skips_the_noise_at_the_start_of_the_sweep():
    """The first points' drop (batch noise, at LRs too small to matter) is steeper than the real
    descent; steepest must still find the real one, as in the ResNet's batch-512 sweep."""
    losses = sigmoid_curve()
    losses[:3] = [2.6, 2.45, 2.3]
    lr = suggest(LRS, losses, "steepest")
    assert math.log10(lr) == pytest.approx(-3.0, abs=0.051)


def test_steepest_is_strictly_before_the_minimum():
    """The last step into the minimum is the steepest drop; the answer is the point before it."""
    lrs = np.logspace(-3, 0, 6)
    assert suggest(lrs, [2.0, 1.9, 1.8, 1.7, 0.5, 3.0], "steepest") == lrs[3]


def test_steepest_ignores_the_blow_up_after_the_minimum():
    losses = sigmoid_curve()
    assert suggest(LRS, losses, "steepest") < LRS[np.argmin(losses)]


@pytest.mark.parametrize("method, divisor", [("min_div_2", 2), ("min_div_10", 10)])
def test_min_div_readings_divide_the_lr_of_the_minimum(method, divisor):
    losses = sigmoid_curve()
    assert suggest(LRS, losses, method) == pytest.approx(LRS[np.argmin(losses)] / divisor)


def test_valley_reads_two_thirds_down_the_longest_descent():
    """Flat at 2.0 for 20 points, straight down for 60, then up: the valley is points 19..79
    (the last flat point starts the descent), and two thirds of 60 steps down it is point 59."""
    losses = np.concatenate([np.full(20, 2.0), np.linspace(1.95, 0.5, 60), np.linspace(0.6, 4, 20)])
    lrs = np.logspace(-5, 0, 100)
    assert suggest(lrs, losses, "valley") == lrs[59]


def test_valley_steps_over_a_bump():
    """A bump half way down must not cut the valley in two: stepping over it, the valley has 60
    points ending at 79, so the reading stays at point 59 (the longest unbroken run, 19..49,
    would put it at 39)."""
    losses = np.concatenate([np.full(20, 2.0), np.linspace(1.95, 0.5, 60), np.linspace(0.6, 4, 20)])
    losses[50] += 0.2
    lrs = np.logspace(-5, 0, 100)
    assert suggest(lrs, losses, "valley") == lrs[59]


def test_valley_is_clipped_to_the_minimum():
    """A long slow descent after a short dip to the minimum: the valley lies past the minimum."""
    losses = np.concatenate([np.linspace(2.0, 0.5, 10), np.linspace(1.5, 0.9, 60), [5.0]])
    lrs = np.logspace(-4, 1, len(losses))
    assert suggest(lrs, losses, "valley") == lrs[9]


@pytest.mark.parametrize("seed", range(20))
def test_no_suggestion_ever_exceeds_the_lr_of_the_minimum(seed):
    rng = np.random.default_rng(seed)
    raw = sigmoid_curve(center=rng.uniform(-5, -1), blowup_at=rng.uniform(-0.5, 0.8))
    losses = smooth_losses(raw + rng.normal(0, 0.15, raw.size), 0.9)
    bottom = LRS[np.argmin(losses)]
    for method in METHODS:
        assert 0 < suggest(LRS, losses, method) <= bottom


def seed_000_like_curve():
    """Seed 000: a sweep from 0.01 whose descent runs up to the minimum; steepest read 0.69."""
    lrs = np.logspace(-2, 1, 100)
    x = np.log10(lrs)
    return lrs, 2.3 - 0.8 / (1 + np.exp(-(x + 0.2) / 0.15)) + np.exp(8 * (x - 0.55))


def test_adam_default_stays_well_below_a_late_steepest_reading_like_seed_000():
    lrs, losses = seed_000_like_curve()
    bottom = lrs[np.argmin(losses)]
    steepest = suggest(lrs, losses, "steepest")
    bounds = suggest_bounds(lrs, losses, "adam")
    assert steepest > bottom / 5  # the trap: the steepest point sits near the minimum
    assert bounds["lr_max"] <= bottom / 10 < steepest


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_default_anneals_three_decades_below_its_cautious_peak(optimizer):
    """Adam keeps the cautious peak but, like SGD, ends the one-cycle a thousandth of it: a floor
    a tenth of the peak left no final annealing and underfit by 5 points on validation."""
    lrs, losses = seed_000_like_curve()
    bounds = suggest_bounds(lrs, losses, optimizer)
    assert bounds["lr_max"] == suggest(lrs, losses, "conservative")
    assert bounds["lr_min"] == pytest.approx(bounds["lr_max"] / 1000) and bounds["lr_min_method"] == "lr_max/1000"


def test_sgd_default_keeps_a_factor_two_from_the_minimum_and_warms_up_from_far_below():
    """On the same curve the SGD peak is half the minimum's LR, and the one-cycle starts three
    decades lower: far below seed 000's first-epoch LR (a tenth of its reading)."""
    lrs, losses = seed_000_like_curve()
    bottom = lrs[np.argmin(losses)]
    bounds = suggest_bounds(lrs, losses, "sgd")
    assert bounds["lr_max"] == pytest.approx(bottom / 2)
    assert bounds["lr_min"] == pytest.approx(bottom / 2000) and bounds["lr_min"] < 0.069 / 10


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_suggest_bounds_reads_the_optimizers_default(optimizer):
    losses = sigmoid_curve()
    method, divisor = DEFAULT_READING[optimizer]
    bounds = suggest_bounds(LRS, losses, optimizer)
    assert bounds["method"] == method and bounds["lr_min_method"] == f"lr_max/{divisor:g}"
    assert bounds["lr_max"] == suggest(LRS, losses, method)
    assert bounds["lr_min"] == pytest.approx(bounds["lr_max"] / divisor, rel=1e-12)
    assert 0 < bounds["lr_min"] < bounds["lr_max"] <= LRS[np.argmin(losses)]


def test_suggest_bounds_takes_an_explicit_method_and_refuses_an_unknown_optimizer():
    losses = sigmoid_curve()
    bounds = suggest_bounds(LRS, losses, "sgd", "steepest")
    assert bounds["lr_max"] == suggest(LRS, losses, "steepest") and bounds["method"] == "steepest"
    assert bounds["lr_min"] == pytest.approx(bounds["lr_max"] / DEFAULT_READING["sgd"][1])
    with pytest.raises(ValueError, match="optimizer"):
        suggest_bounds(LRS, losses, "rmsprop")


def test_suggest_handles_the_non_finite_last_point_of_a_diverged_sweep():
    losses = list(sigmoid_curve()[:120]) + [math.inf]
    for method in METHODS:
        assert suggest(LRS[:121], losses, method) > 0


def test_suggest_refuses_a_curve_that_never_falls():
    with pytest.raises(ValueError, match="start_lr"):
        suggest(LRS, np.linspace(1.0, 3.0, LRS.size), "min_div_2")
    with pytest.raises(ValueError, match="method"):
        suggest(LRS, sigmoid_curve(), "median")


def test_suggestions_from_a_real_sweep():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = range_test(model, opt, nn.CrossEntropyLoss(), batches(4), start_lr=1e-4,
                        end_lr=100, num_iter=40, smooth=0.8, device=CPU)
    bounds = suggest_bounds(result.lrs, result.losses, "sgd")
    assert 0 < bounds["lr_min"] < bounds["lr_max"] <= result.lrs[int(np.argmin(result.losses))]


def test_each_param_group_sweeps_at_its_lr_scale():
    """A bias group trained at 64x the LR (--bias-lr-scale) keeps that ratio during the sweep."""
    from core.train.optim import make_optimizer as trainer_optimizer

    model = TinyNet(dropout=0.0)
    opt = trainer_optimizer("sgd", model, 0.0, 5e-4, bias_lr_scale=64.0)
    seen = []
    step = opt.step

    def recording_step(*args, **kwargs):
        seen.append([g["lr"] for g in opt.param_groups])
        return step(*args, **kwargs)

    opt.step = recording_step
    result = range_test(model, opt, nn.CrossEntropyLoss(), batches(2), start_lr=1e-4, end_lr=1e-2, num_iter=5,
                        device=CPU)
    assert [lrs[0] for lrs in seen] == result.lrs
    assert [lrs[1] for lrs in seen] == pytest.approx([64 * lr for lr in result.lrs], rel=1e-12)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_each_optimizer_choice_builds_its_torch_optimizer_with_the_weight_decay(name, cls):
    from core.train.optim import make_optimizer as trainer_optimizer

    opt = trainer_optimizer(name, TinyNet(), 0.0, 5e-4)
    assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 5e-4
    assert suggest_bounds([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 3.0], name)["lr_max"] > 0

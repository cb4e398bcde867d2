"""Leslie Smith's learning-rate range test, and reading a learning rate off its curve.

The test trains for ``num_iter`` steps while the LR sweeps from ``start_lr`` to ``end_lr`` and
records the loss at every step. The loss first stalls (the LR is too small to matter), then
falls, bottoms out, and explodes (the LR is too large). A good peak LR lies on the falling part.
Afterwards the model, optimizer, GradScaler and torch RNG are put back bit for bit, so the test
can run right before training without changing what training does.

Reading the curve (every method works on the smoothed loss and returns one LR):

* ``steepest``: where the loss falls fastest per decade of LR, searched only before the minimum
  and, as fastai does, after the first tenth of the sweep.
* ``valley`` (fastai's method): find the longest descent. Its length is the longest strictly
  decreasing subsequence of the loss, so small bumps are stepped over rather than cutting the
  descent in two; the descent is taken to be that many points ending where the subsequence
  ends. Pick the point two thirds of the way down it: well into the drop, short of the bottom.
* ``min_div_2`` and ``min_div_10``: the LR of the minimum, halved or divided by ten.
* ``conservative``: the smaller of ``valley`` and ``min_div_10``.

Every suggestion is also clipped to at most the LR of the minimum smoothed loss: past the
minimum the loss is rising, and the sweep is already diverging there. The default reading
depends on the optimizer (``DEFAULT_READING``), since SGD with BN and weight decay tolerates a
peak close to the turn and Adam does not; docs/lr_finder.md gives the sweeps and runs behind
each default.
"""

import contextlib
import dataclasses
import math

import numpy as np
import torch

from ..device import autocast, make_scaler
from ..progress import Ticker
from .engine import train_step

METHODS = ("steepest", "valley", "min_div_2", "min_div_10", "conservative")
# The default (lr_max method, lr_max / lr_min) per optimizer; see the module docstring.
DEFAULT_READING = {"sgd": ("min_div_2", 1000.0), "muon": ("min_div_2", 1000.0), "adam": ("conservative", 1000.0),
                   "adamw": ("conservative", 1000.0)}
STEEPEST_SKIP = 0.1  # the share of the sweep's first points that steepest leaves out
VALLEY_POSITION = 2 / 3  # how far down the longest descent the valley method reads its LR


def lr_schedule(start_lr, end_lr, num_iter, mode="exp"):
    """The LR of each of ``num_iter`` steps: geometric ('exp') or even ('linear') spacing.

    The endpoints are pinned, so the first step is exactly ``start_lr`` and the last exactly
    ``end_lr`` whatever the rounding in between.
    """
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr!r} and {end_lr!r}")
    if num_iter < 2:
        raise ValueError(f"num_iter must be at least 2, got {num_iter!r}")
    last = num_iter - 1
    if mode == "exp":  # in log space: end_lr / start_lr itself may overflow
        log_start, log_end = math.log(start_lr), math.log(end_lr)
        lrs = [math.exp(log_start + (log_end - log_start) * i / last) for i in range(num_iter)]
    else:
        lrs = [start_lr + (end_lr - start_lr) * i / last for i in range(num_iter)]
    lrs[0], lrs[-1] = start_lr, end_lr
    return lrs


class DebiasedEMA:
    """Exponential moving average of the loss, divided by (1 - beta**n) to undo its pull to 0.

    The raw batch loss is too noisy to read a curve from; the plain EMA starts at zero and so
    understates the first ~1/(1-beta) steps, which would fake a minimum at the very start.
    """

    def __init__(self, beta):
        if not 0 <= beta < 1:
            raise ValueError(f"smoothing beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.avg = 0.0
        self.count = 0

    def update(self, value):
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta ** self.count)


def smooth_losses(raw, beta):
    """The debiased EMA of a whole loss sequence, as ``range_test`` computes it step by step."""
    ema = DebiasedEMA(beta)
    return [ema.update(value) for value in raw]


@dataclasses.dataclass
class RangeTestResult:
    """What a sweep measured, one entry per step taken (fewer than num_iter if it diverged)."""

    lrs: list  # the LR each step trained at
    losses: list  # the smoothed loss: what suggestions and plots read
    raw_losses: list  # the loss as measured
    diverged_at: int | None  # the step index where the sweep stopped on divergence, else None
    mode: str  # 'exp' (plot on a log LR axis) or 'linear'
    loss_kind: str  # 'train' (the batch's loss) or 'val' (mean loss over val_batches)


def range_test(model, optimizer, loss_fn, train_batches, *, start_lr=1e-7, end_lr=10,
               num_iter=100, mode="exp", smooth=0.98, diverge=5.0, val_batches=None, device,
               amp_dtype=None, scaler=None, progress=True, log_every=10):
    """Sweep the LR over ``num_iter`` training steps and record the loss; see the module docstring.

    ``train_batches`` is re-iterable (a list, or a loader that starts a new epoch on each
    ``__iter__``) of (x, y) batches already on ``device``; it is cycled if num_iter is longer.
    Every param group trains at the swept LR times its ``lr_scale`` (1 when absent). In 'train'
    mode the loss recorded for a step is that step's batch loss, measured before its update; with
    ``val_batches`` it is the mean loss over them after the update, in eval mode. The sweep
    stops once the smoothed loss exceeds ``diverge`` times the best so far, or stops being
    finite. Everything the sweep changes is restored afterwards, even if it raises. ``progress``:
    a bar on a terminal, else (or without it) a line every ``log_every`` steps with the step's
    LR and smoothed loss, which the sweep reads on the host every step anyway.
    """
    schedule = lr_schedule(start_lr, end_lr, num_iter, mode)
    if scaler is None:
        scaler = make_scaler(device, amp_dtype)
    result = RangeTestResult(lrs=[], losses=[], raw_losses=[], diverged_at=None, mode=mode,
                             loss_kind="train" if val_batches is None else "val")
    ema = DebiasedEMA(smooth)
    best = math.inf
    ticker = Ticker(num_iter, "range test step", log_every, enabled=progress)
    with _restored_afterwards(model, optimizer, scaler, device), contextlib.closing(ticker):
        model.train()
        for i, (lr, (x, y)) in enumerate(zip(schedule, _cycle(train_batches))):
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss, _ = train_step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler)
            if val_batches is None:
                raw = loss.item()
            else:
                raw = _mean_loss(model, loss_fn, val_batches, device, amp_dtype)
            smoothed = ema.update(raw)
            result.lrs.append(lr)
            result.raw_losses.append(raw)
            result.losses.append(smoothed)
            ticker.step(f"LR {lr:.4g}, smoothed loss {smoothed:.4f}")
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                result.diverged_at = i
                break
            best = min(best, smoothed)
    return result


def _cycle(batches):
    """Endless batches, re-iterating ``batches`` for each pass. Unlike itertools.cycle this keeps
    nothing in memory and lets a loader start a fresh (reshuffled) epoch."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_batches yielded no batches")


def _mean_loss(model, loss_fn, batches, device, amp_dtype):
    """The loss over ``batches``, weighted by batch size, in eval mode; back to train after."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, amp_dtype):
        for x, y in batches:
            total = total + loss_fn(model(x), y).float() * len(y)
            count += len(y)
    model.train()
    if count == 0:
        raise ValueError("val_batches yielded no batches")
    return (total / count).item()


def _cpu_clone(obj):
    """A copy of nested dicts/lists/tuples of tensors that shares no memory with the original;
    tensors go to the CPU so the snapshot costs no accelerator memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _cpu_clone(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(value) for value in obj)
    return obj


def _model_tensors(model):
    """Parameters and buffers by name; unlike state_dict() this includes non-persistent buffers."""
    yield from model.named_parameters()
    yield from model.named_buffers()


@contextlib.contextmanager
def _restored_afterwards(model, optimizer, scaler, device):
    """Snapshot the model (tensors, grads, train/eval flags), optimizer, scaler and torch RNG (the
    CPU's, and CUDA's on a CUDA device); put them back on exit. Model tensors are copied back in
    place, so the optimizer's references to the parameters stay valid."""
    tensors = {name: _cpu_clone(t) for name, t in _model_tensors(model)}
    grads = {name: _cpu_clone(p.grad) for name, p in model.named_parameters()}
    modes = [(module, module.training) for module in model.modules()]
    optimizer_state = _cpu_clone(optimizer.state_dict())
    scaler_state = scaler.state_dict()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in _model_tensors(model):
                t.copy_(tensors[name])
        for name, p in model.named_parameters():
            p.grad = None if grads[name] is None else grads[name].to(p.device)
        for module, training in modes:
            module.training = training
        optimizer.load_state_dict(optimizer_state)
        scaler.load_state_dict(scaler_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def suggest(lrs, losses, method):
    """One LR read off a sweep's (lrs, smoothed losses) by ``method`` (see the module docstring),
    never above the LR of the minimum loss."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lrs, losses = _as_curve(lrs, losses)
    bottom = int(np.argmin(losses))
    if bottom == 0:
        raise ValueError("the loss never went down during the sweep: lower start_lr")
    if method == "steepest":
        lr = _steepest(lrs, losses, bottom)
    elif method == "valley":
        lr = _valley(lrs, losses)
    elif method == "min_div_2":
        lr = lrs[bottom] / 2
    elif method == "min_div_10":
        lr = lrs[bottom] / 10
    else:
        lr = min(_valley(lrs, losses), lrs[bottom] / 10)
    return float(min(lr, lrs[bottom]))


def suggest_bounds(lrs, losses, optimizer, method=None):
    """{'lr_max', 'lr_min', 'method', 'lr_min_method'} for a one-cycle or cyclic schedule trained
    with ``optimizer`` ('sgd' or 'adam'): lr_max read by ``method`` (default: the optimizer's, see
    DEFAULT_READING), lr_min the optimizer's divisor below it, each named with how it was read."""
    if optimizer not in DEFAULT_READING:
        raise ValueError(f"optimizer must be one of {tuple(DEFAULT_READING)}, got {optimizer!r}")
    default_method, divisor = DEFAULT_READING[optimizer]
    method = method or default_method
    lr_max = suggest(lrs, losses, method)
    return {"lr_max": lr_max, "lr_min": lr_max / divisor, "method": method, "lr_min_method": f"lr_max/{divisor:g}"}


def _as_curve(lrs, losses):
    """Float arrays; a non-finite loss (the step that blew up) counts as +inf."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.shape != losses.shape or lrs.ndim != 1 or len(lrs) < 2:
        raise ValueError("lrs and losses must be 1-D sequences of the same length, at least 2")
    if lrs[0] <= 0 or np.any(np.diff(lrs) <= 0):
        raise ValueError("lrs must be positive and strictly increasing")
    return lrs, np.where(np.isfinite(losses), losses, np.inf)


def _steepest(lrs, losses, bottom):
    """The LR where the loss falls fastest per decade of LR, among the points before the minimum
    but past the first STEEPEST_SKIP of the sweep. At its first LRs, too small to change the
    weights, the smoothed loss still moves with the noise of the first few batches, which can
    be the steepest drop of all (docs/lr_finder.md)."""
    slope = np.gradient(losses[:bottom + 1], np.log10(lrs[:bottom + 1]))
    skip = int(STEEPEST_SKIP * len(losses))
    skip = skip if skip < bottom else 0
    return lrs[skip + int(np.argmin(slope[skip:bottom]))]


def _valley(lrs, losses):
    """The point VALLEY_POSITION of the way down the longest descent (see the module docstring)."""
    length = np.ones(len(losses), dtype=int)  # longest decreasing subsequence ending at each i
    for i in range(1, len(losses)):
        higher = losses[:i] > losses[i]
        if higher.any():
            length[i] = length[:i][higher].max() + 1
    end = int(np.argmax(length))
    start = end - (length[end] - 1)
    return lrs[start + round(VALLEY_POSITION * (end - start))]

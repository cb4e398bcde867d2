"""Learning-rate schedules, written by hand and stepped once per batch.

``OneCycle`` follows the semantics of ``torch.optim.lr_scheduler.OneCycleLR`` step for step
(same arguments, same LR and momentum or Adam beta1 at every step, same ValueError past the
end), so a user can read torch's documentation and get exactly what it says.
"""

import math


def anneal(start, end, pct, strategy):
    """Interpolate from ``start`` (pct=0) to ``end`` (pct=1): 'cos' or 'linear'."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return start + (end - start) * pct


def _per_group(name, value, groups):
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"{name} has {len(value)} values for {len(groups)} param groups")
        return [float(v) for v in value]
    return [float(value)] * len(groups)


class StepSchedule:
    """What every per-batch schedule shares: write ``values_at(last_step)`` into the optimizer
    (LR, and momentum or Adam's beta1 when cycled), step, and save or restore the position."""

    def _apply(self):
        """A group with ``train_steps`` N (``core.train.optim.param_groups``) trains at LR 0 from
        step N on: frozen, its momentum and weight decay included."""
        lrs, moms = self.values_at(self.last_step)
        for group, lr, mom in zip(self.optimizer.param_groups, lrs, moms):
            group["lr"] = lr if self.last_step < group.get("train_steps", math.inf) else 0.0
            if self.cycle_momentum:
                if self.use_beta1:
                    group["betas"] = (mom, *group["betas"][1:])
                else:
                    group["momentum"] = mom
        self._last_lr = lrs

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return list(self._last_lr)

    def current_lr(self):
        """The schedule's own LR now: what the logs and plots show, whatever multiple (lr_scale) the
        first group trains at, and whether or not it is frozen."""
        return self._last_lr[0] / self.optimizer.param_groups[0].get("lr_scale", 1.0)

    def state_dict(self):
        return {"last_step": self.last_step}

    def load_state_dict(self, state):
        self.last_step = int(state["last_step"])
        self._apply()


class OneCycle(StepSchedule):
    """Leslie Smith's one-cycle policy: warm up to ``max_lr``, then anneal to ``max_lr/div/final_div``.

    Momentum (SGD) or beta1 (Adam) moves opposite to the LR when ``cycle_momentum`` is set:
    high momentum steadies the small-LR ends, low momentum leaves room at the peak.
    """

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95):
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.anneal_strategy = anneal_strategy
        self.cycle_momentum = cycle_momentum
        groups = optimizer.param_groups
        peak = _per_group("max_lr", max_lr, groups)
        self.max_lrs = peak
        self.initial_lrs = [p / div_factor for p in peak]
        self.min_lrs = [lr / final_div_factor for lr in self.initial_lrs]
        self.use_beta1 = "betas" in optimizer.defaults
        if cycle_momentum and not self.use_beta1 and "momentum" not in optimizer.defaults:
            raise ValueError("cycle_momentum needs an optimizer with 'momentum' or 'betas'")
        self.base_momentums = _per_group("base_momentum", base_momentum, groups)
        self.max_momentums = _per_group("max_momentum", max_momentum, groups)
        # Each phase: (last step, LR from -> to, momentum from -> to) as keys into the tables.
        warm_end = float(pct_start * total_steps) - 1
        if three_phase:
            self.phases = [
                (warm_end, "initial", "max", "max", "base"),
                (float(2 * pct_start * total_steps) - 2, "max", "initial", "base", "max"),
                (total_steps - 1, "initial", "min", "max", "max"),
            ]
        else:
            self.phases = [
                (warm_end, "initial", "max", "max", "base"),
                (total_steps - 1, "max", "min", "base", "max"),
            ]
        self.last_step = 0
        self._apply()

    def _tables(self, i):
        lr = {"initial": self.initial_lrs[i], "max": self.max_lrs[i], "min": self.min_lrs[i]}
        mom = {"base": self.base_momentums[i], "max": self.max_momentums[i]}
        return lr, mom

    def values_at(self, step):
        """The (lrs, momentums) per param group at ``step``, without touching the optimizer."""
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps is "
                             f"{self.total_steps}")
        lrs, moms = [], []
        for i in range(len(self.max_lrs)):
            lr_table, mom_table = self._tables(i)
            start = 0.0
            for k, (end, lr_from, lr_to, m_from, m_to) in enumerate(self.phases):
                if step <= end or k == len(self.phases) - 1:
                    # A phase of no length (a warm-up of one step) is already at its end value;
                    # torch divides by zero there.
                    pct = (step - start) / (end - start) if end != start else 1.0
                    lrs.append(anneal(lr_table[lr_from], lr_table[lr_to], pct, self.anneal_strategy))
                    moms.append(anneal(mom_table[m_from], mom_table[m_to], pct, self.anneal_strategy))
                    break
                start = end
        return lrs, moms


def one_cycle_for_recipe(optimizer, lr_max, lr_min, epochs, steps_per_epoch, max_at_epoch, cycle_momentum=True,
                         lr_end=None):
    """The assignments' one-cycle: linear up from lr_min to lr_max at ``max_at_epoch``, then
    linearly back down to lr_min at the end (no annihilation below lr_min), or to ``lr_end``
    where given: airbench's triangle, which starts at a fifth of its peak and ends at 7%. Without
    ``cycle_momentum`` the optimizer's own momentum (or beta1) is left as it is, as in Page's
    ResNet-9 recipe (fixed Nesterov momentum 0.9). A param group with an ``lr_scale`` (see
    ``core.train.optim.param_groups``) follows the same cycle at that multiple of the LR."""
    total = epochs * steps_per_epoch
    peaks = [lr_max * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return OneCycle(optimizer, max_lr=peaks, total_steps=total, pct_start=max_at_epoch / epochs,
                    anneal_strategy="linear", div_factor=lr_max / lr_min,
                    final_div_factor=1.0 if lr_end is None else lr_min / lr_end,
                    cycle_momentum=cycle_momentum)


class Cyclic(StepSchedule):
    """Smith's cyclical learning rates: triangle waves between ``base_lr`` and ``max_lr``.

    Follows ``torch.optim.lr_scheduler.CyclicLR`` step for step for its three built-in modes.
    Each cycle rises for ``step_size_up`` steps and falls for ``step_size_down`` (default: the
    same). The wave's height is scaled by 'triangular': 1; 'triangular2': halved each cycle;
    'exp_range': ``gamma ** step``, shrinking every step rather than every cycle. Momentum (SGD)
    or beta1 (Adam) runs opposite to the LR between ``max_momentum`` and ``base_momentum``.

    Like torch, construction writes the step-0 values (LR = base_lr, momentum = max_momentum)
    and torch's bookkeeping keys ('initial_lr', 'base_momentum', 'max_momentum') into the param
    groups, so an optimizer checkpoint looks the same as one made under CyclicLR.
    """

    modes = ("triangular", "triangular2", "exp_range")

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0, cycle_momentum=True, base_momentum=0.8,
                 max_momentum=0.9):
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        if step_size_down is None:
            step_size_down = step_size_up
        if step_size_up <= 0 or step_size_down < 0:
            raise ValueError(f"step sizes must be up > 0 and down >= 0, got {step_size_up!r} "
                             f"and {step_size_down!r}")
        self.optimizer = optimizer
        self.mode = mode
        self.gamma = gamma
        self.cycle_momentum = cycle_momentum
        self.total_size = float(step_size_up) + float(step_size_down)
        self.step_ratio = float(step_size_up) / self.total_size
        groups = optimizer.param_groups
        self.base_lrs = _per_group("base_lr", base_lr, groups)
        self.max_lrs = _per_group("max_lr", max_lr, groups)
        self.use_beta1 = "betas" in optimizer.defaults
        if cycle_momentum and not self.use_beta1 and "momentum" not in optimizer.defaults:
            raise ValueError("cycle_momentum needs an optimizer with 'momentum' or 'betas'")
        self.base_momentums = _per_group("base_momentum", base_momentum, groups)
        self.max_momentums = _per_group("max_momentum", max_momentum, groups)
        for i, group in enumerate(groups):
            group.setdefault("initial_lr", self.base_lrs[i])
            if cycle_momentum:
                group["base_momentum"] = self.base_momentums[i]
                group["max_momentum"] = self.max_momentums[i]
        self.last_step = 0
        self._apply()

    def _scale(self, cycle, step):
        """The fraction of the full wave height (max - base) that ``step`` in ``cycle`` gets."""
        if self.mode == "triangular2":
            return 1 / (2.0 ** (cycle - 1))
        if self.mode == "exp_range":
            return self.gamma ** step
        return 1.0

    def values_at(self, step):
        """The (lrs, momentums) per param group at ``step``, without touching the optimizer."""
        cycle = math.floor(1 + step / self.total_size)
        x = 1.0 + step / self.total_size - cycle  # position inside the cycle, in [0, 1)
        if x <= self.step_ratio:  # height on the wave: 0 at base_lr, 1 at the peak
            height = x / self.step_ratio
        else:
            height = (x - 1) / (self.step_ratio - 1)
        scale = self._scale(cycle, step)
        lrs = [lo + (hi - lo) * height * scale for lo, hi in zip(self.base_lrs, self.max_lrs)]
        moms = [hi - (hi - lo) * height * scale
                for lo, hi in zip(self.base_momentums, self.max_momentums)]
        return lrs, moms


def trace(schedule, steps):
    """The (lr, momentum) of the first param group at each of ``steps`` steps, for plotting.
    A schedule that does not cycle momentum leaves the optimizer's own value in force."""
    values = [schedule.values_at(s) for s in range(steps)]
    lrs = [lrs[0] for lrs, _ in values]
    if schedule.cycle_momentum:
        return lrs, [moms[0] for _, moms in values]
    group = schedule.optimizer.param_groups[0]
    fixed = group["betas"][0] if schedule.use_beta1 else group.get("momentum", 0.0)
    return lrs, [fixed] * steps

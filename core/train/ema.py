"""An exponential moving average of a model's weights, evaluated in place of the live weights.

Page's bag of tricks evaluates such an average: late in a one-cycle run the weights still jitter
from batch to batch around the point the LR is annealing towards, and the average sits nearer
that point than any single step does.
"""

import copy

import torch


class WeightEMA:
    """``module`` is a frozen copy of ``model`` whose floating-point parameters and buffers follow
    ``avg = decay * avg + (1 - decay) * live`` after every ``update()``; other buffers (BN's step
    counts) are copied.

    The BN running statistics are averaged along with the weights, as Page does, rather than
    re-estimated for the averaged weights, which would cost a pass over training images at every
    evaluation. The two agree only while the weights barely move within the average's window of
    about ``1 / (1 - decay)`` steps: late in a one-cycle run, at short windows. A long window, or
    one over the high-LR phase, averages weights whose activations the averaged statistics no
    longer describe, and the average can score near chance until the LR has fallen (see
    docs/lab/results.md); ``--recalibrate-bn`` re-estimates the statistics before each evaluation.
    """

    def __init__(self, model, decay):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must lie strictly between 0 and 1")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._floats = [[a for a, _ in pairs if a.is_floating_point()], [b for a, b in pairs if a.is_floating_point()]]
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self):
        # One fused call over all the floating-point tensors: a loop launches ~50 ops per step.
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1 - self.decay)
        for avg, live in self._others:
            avg.copy_(live)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)

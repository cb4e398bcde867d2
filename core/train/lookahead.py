"""airbench's Lookahead: a slow copy of the weights that the live ones are put back to.

Every ``every`` steps the slow weights move a fraction ``1 - decay`` of the way to the live
ones, and the live weights restart from there: Lookahead (Zhang et al., 2019) with a pull that
weakens as the run ends, ``decay = 0.95 ** 5 * (step / total) ** 3``. Early on ``decay`` is
near 0 and the slow copy simply follows; late, it averages the last few hundred steps while
training goes on from the average, which a moving average evaluated on the side does not do.
At the last step the live weights take the slow ones, so the run ends on them.
"""

import torch

LOOKAHEAD_EVERY = 5  # airbench's interval, in steps


class Lookahead:
    """Lookahead over every floating-point tensor of ``model``'s state (weights and BatchNorm
    statistics alike), for a run of ``total_steps`` steps; call ``update()`` after each."""

    def __init__(self, model, total_steps, every=LOOKAHEAD_EVERY, base_decay=0.95 ** 5, power=3):
        self.total_steps, self.every, self.base_decay, self.power = total_steps, every, base_decay, power
        self.live = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.live]
        self.steps = 0

    def decay(self, step):
        """How much of the slow weights stays at ``step``."""
        return self.base_decay * (step / self.total_steps) ** self.power

    @torch.no_grad()
    def update(self):
        self.steps += 1
        if self.steps % self.every == 0:
            torch._foreach_lerp_(self.slow, self.live, 1 - self.decay(self.steps))
            torch._foreach_copy_(self.live, self.slow)
        if self.steps == self.total_steps:
            torch._foreach_copy_(self.live, self.slow)

    def state_dict(self):
        return {"steps": self.steps, "slow": list(self.slow)}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        torch._foreach_copy_(self.slow, list(state["slow"]))

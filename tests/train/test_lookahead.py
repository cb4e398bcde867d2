"""airbench's Lookahead against a NumPy re-derivation of its definition, and its resume."""

import numpy as np
import torch

from core.train.lookahead import Lookahead


def drift(step, shape, seed=0):
    """What a training step adds to every weight at ``step``: fixed, so both sides see the same."""
    return np.random.default_rng([seed, step]).normal(size=shape)


def numpy_lookahead(start, total, every=5):
    """slow <- slow + (1 - d) (live - slow) and live <- slow every ``every`` steps, with
    d = 0.95^5 (k / total)^3 at step k; live <- slow at the last step."""
    live, slow = start.copy(), start.copy()
    for k in range(1, total + 1):
        live = live + drift(k, live.shape)
        if k % every == 0:
            d = 0.95 ** 5 * (k / total) ** 3
            slow = slow + (1 - d) * (live - slow)
            live = slow.copy()
        if k == total:
            live = slow.copy()
    return live, slow


def torch_run(model, lookahead, steps, first=1):
    weight = model.weight
    with torch.no_grad():
        for k in range(first, first + steps):
            weight += torch.from_numpy(drift(k, tuple(weight.shape))).to(weight.dtype)
            lookahead.update()


def test_lookahead_matches_its_definition_step_for_step():
    for total in (23, 25):  # a last step between pulls, and one on a pull
        model = torch.nn.Linear(4, 3, bias=False).double()
        start = model.weight.detach().numpy().copy()
        lookahead = Lookahead(model, total)
        torch_run(model, lookahead, total)
        live, slow = numpy_lookahead(start, total)
        np.testing.assert_allclose(model.weight.detach().numpy(), live, rtol=1e-12)
        np.testing.assert_allclose(lookahead.slow[0].numpy(), slow, rtol=1e-12)
        assert torch.equal(model.weight, lookahead.slow[0]), "the run ends on the slow weights"


def test_lookahead_pulls_batch_norm_statistics_too_and_leaves_counts_alone():
    model = torch.nn.BatchNorm1d(2)
    lookahead = Lookahead(model, 10)
    assert len(lookahead.slow) == 4  # weight, bias, running mean and variance; not the batch count
    model(torch.randn(8, 2) + 3)
    for _ in range(5):
        lookahead.update()
    assert model.num_batches_tracked.item() == 1
    assert torch.equal(model.running_mean, lookahead.slow[2])


def test_a_lookahead_restored_from_its_state_goes_on_as_the_uninterrupted_one():
    total = 30
    straight, interrupted = (torch.nn.Linear(4, 3, bias=False).double() for _ in range(2))
    interrupted.load_state_dict(straight.state_dict())
    a = Lookahead(straight, total)
    torch_run(straight, a, total)
    b = Lookahead(interrupted, total)
    torch_run(interrupted, b, 12)
    state = {k: v.clone() for k, v in interrupted.state_dict().items()}, b.state_dict()
    resumed = torch.nn.Linear(4, 3, bias=False).double()
    resumed.load_state_dict(state[0])
    c = Lookahead(resumed, total)
    c.load_state_dict(state[1])
    torch_run(resumed, c, total - 12, first=13)
    assert torch.equal(resumed.weight, straight.weight)

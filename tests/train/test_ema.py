"""WeightEMA against torch's own EMA (AveragedModel with get_ema_multi_avg_fn)."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from core.train.ema import WeightEMA


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def test_matches_torch_averaged_model_on_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = small_net()
    ema = WeightEMA(model, decay=0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    reference.update_parameters(model)  # torch's first update copies; ours starts as that copy
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(7):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update()
        reference.update_parameters(model)
    ours, theirs, live = ema.state_dict(), reference.module.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        if ours[name].is_floating_point():
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)
            assert not torch.equal(ours[name], live[name]), f"{name} should lag the live weights"
        else:
            assert torch.equal(ours[name], live[name]), "BN step counts are copied, not averaged"


def test_follows_an_exponential_average_and_leaves_the_live_model_alone():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.75)
    expected = 0.0
    for value in (4.0, 4.0, -8.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        expected = 0.75 * expected + 0.25 * value
        assert ema.module.weight[0, 0].item() == pytest.approx(expected)
        assert model.weight[0, 0].item() == value
    assert not ema.module.training and not ema.module.weight.requires_grad


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_must_lie_strictly_inside_zero_and_one(decay):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        WeightEMA(nn.Linear(2, 2), decay)


def test_the_fused_update_is_the_per_tensor_lerp_bit_for_bit():
    """update() lerps every floating-point tensor in one foreach call; the result must be what a
    loop of lerp_ gives, so runs are unchanged by it."""
    torch.manual_seed(3)
    model = small_net()
    ema = WeightEMA(model, decay=0.99)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, 8, 8))  # moves the BN statistics and step count
        ema.update()
        for name, live in model.state_dict().items():
            if live.is_floating_point():
                expected[name].lerp_(live, 1 - 0.99)
            else:
                expected[name].copy_(live)
    assert all(torch.equal(expected[k], v) for k, v in ema.state_dict().items())

"""Ghost batch norm against per-slice F.batch_norm and a NumPy re-derivation of its statistics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.models import MODELS
from core.models.norm import GhostBatchNorm2d


def batch(n=48, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Slices with different offsets and scales, so whole-batch and per-slice statistics differ.
    shift = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / 8
    return torch.randn(n, c, 6, 6, generator=g) * (1 + shift) + 3 * shift


@pytest.mark.parametrize("ghost,n", [(16, 48), (16, 40), (7, 48)])
def test_each_slice_is_normalized_by_its_own_statistics(ghost, n):
    x = batch(n)
    layer = GhostBatchNorm2d(5, ghost)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    want = torch.cat([F.batch_norm(s, None, None, layer.weight, layer.bias, True, eps=layer.eps)
                      for s in x.split(ghost)])
    torch.testing.assert_close(layer(x), want)
    whole = F.batch_norm(x, None, None, layer.weight, layer.bias, True, eps=layer.eps)
    assert (layer(x) - whole).abs().max() > 0.1


def test_running_statistics_are_the_slice_averages():
    x, ghost, momentum = batch(48), 16, 0.1
    layer = GhostBatchNorm2d(5, ghost, momentum=momentum)
    layer(x)
    slices = x.numpy().reshape(3, 16, 5, 6, 6)
    mean = slices.mean(axis=(1, 3, 4)).mean(0)
    var = slices.var(axis=(1, 3, 4), ddof=1).mean(0)
    np.testing.assert_allclose(layer.running_mean.numpy(), momentum * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var.numpy(), (1 - momentum) + momentum * var, rtol=1e-5)
    assert layer.num_batches_tracked.item() == 1


def test_momentum_none_keeps_the_cumulative_average_of_the_slice_statistics():
    layer = GhostBatchNorm2d(5, 16, momentum=None)
    xs = [batch(48, seed=s) for s in range(3)]
    for x in xs:
        layer(x)
    slices = np.stack([x.numpy().reshape(3, 16, 5, 6, 6) for x in xs])
    np.testing.assert_allclose(layer.running_mean.numpy(), slices.mean(axis=(0, 2, 4, 5)).mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var.numpy(), slices.var(axis=(2, 4, 5), ddof=1).mean((0, 1)), rtol=1e-5)


def test_matches_batchnorm_when_the_slice_holds_the_batch_and_in_eval():
    x = batch(32)
    ghost, plain = GhostBatchNorm2d(5, 32), nn.BatchNorm2d(5)
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(batch(10, seed=1)), plain(batch(10, seed=1)))


def test_gradients_match_per_slice_batchnorm():
    x, ghost = batch(48), 16
    weighting = torch.randn(48, 5, 6, 6, generator=torch.Generator().manual_seed(1))
    layer = GhostBatchNorm2d(5, ghost)
    x1 = x.clone().requires_grad_()
    (layer(x1) * weighting).sum().backward()
    w, b, x2 = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias, x))
    want = torch.cat([F.batch_norm(s, None, None, w, b, True, eps=layer.eps) for s in x2.split(ghost)])
    (want * weighting).sum().backward()
    for got, ref in ((x1.grad, x2.grad), (layer.weight.grad, w.grad), (layer.bias.grad, b.grad)):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref)


def test_ghost_resnet_keeps_parameters_and_state_dict_of_the_plain_one():
    plain, ghost = MODELS["resnet"](), MODELS["resnet"](ghost_batch=32)
    norms = [m for m in ghost.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8 and all(isinstance(m, GhostBatchNorm2d) and m.ghost_batch == 32 for m in norms)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.modules())
    ghost.load_state_dict(plain.state_dict())
    plain.eval(), ghost.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ghost(x), plain(x))


def test_ghost_batch_must_be_positive():
    with pytest.raises(ValueError, match="ghost_batch"):
        GhostBatchNorm2d(5, 0)


def test_one_reduction_keeps_the_layout_and_dtype_of_the_per_slice_batch_norm():
    """The slices are reduced in one pass over a reshaped view: in a channels-last bf16 batch, as
    the ResNet trains on the CPU and on GPUs, the output keeps both and matches per-slice BN."""
    x = batch(64, c=8).contiguous(memory_format=torch.channels_last)
    layer = GhostBatchNorm2d(8, 16)
    calls = []
    real = F.batch_norm
    try:
        F.batch_norm = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        out = layer(x.bfloat16())
    finally:
        F.batch_norm = real
    assert not calls, "training slices go through one reduction, not a call per slice"
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    want = torch.cat([F.batch_norm(s.float(), None, None, layer.weight, layer.bias, True, eps=layer.eps)
                      for s in x.bfloat16().split(16)])
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)

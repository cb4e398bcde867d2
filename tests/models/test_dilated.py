import pytest
import torch
from torch import nn

from core.models import MODELS
from core.models.dilated import DilatedNet, Residual, SqueezeExcite
from core.report.receptive_field import receptive_field_table

VARIANTS = ["strided", "dilated"]
# the net before 2026-12-05 (five full convs at width 32), still reachable by flag
FORMER_NET = dict(width=32, full_convs=5)
C4_SIZES = [4, 8, 16]


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("downsample", VARIANTS)
@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_budget_and_output(downsample, c4_size):
    model = DilatedNet(downsample=downsample, c4_size=c4_size)
    assert 150_000 < n_params(model) < 200_000
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("downsample", VARIANTS)
@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_assignment_rules(downsample, c4_size):
    model = DilatedNet(downsample=downsample, c4_size=c4_size)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert any(c.dilation[0] > 1 for c in convs(model))
    gaps = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert len(gaps) == 1 and gaps[0].output_size in (1, (1, 1))


@pytest.mark.parametrize("downsample", VARIANTS)
def test_has_depthwise_separable_conv(downsample):
    layers = convs(DilatedNet(downsample=downsample))
    pairs = [(a, b) for a, b in zip(layers, layers[1:])
             if a.groups == a.in_channels > 1 and a.out_channels == a.in_channels]
    assert pairs
    assert all(b.kernel_size == (1, 1) and b.in_channels == a.out_channels and b.groups == 1
               for a, b in pairs)


@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_only_the_strided_variant_downsamples(c4_size):
    strided = DilatedNet(downsample="strided", c4_size=c4_size)
    dilated = DilatedNet(downsample="dilated", c4_size=c4_size)
    assert sum(c.stride[0] == 2 for c in convs(strided)) == {4: 3, 8: 2, 16: 1}[c4_size]
    assert strided.blocks(torch.randn(1, 3, 32, 32)).shape[-2:] == (c4_size, c4_size)
    assert dilated.blocks(torch.randn(1, 3, 32, 32)).shape[-2:] == (32, 32)
    assert all(c.stride[0] == 1 for c in convs(dilated))
    assert n_params(strided) == n_params(dilated)


@pytest.mark.parametrize("downsample", VARIANTS)
@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_receptive_field(downsample, c4_size):
    rows = receptive_field_table(DilatedNet(downsample=downsample, c4_size=c4_size))
    assert rows[-1]["rout"] > 44 and rows[-2]["rout"] > 44  # with and without GAP
    assert rows[-1]["layer"].startswith("head")


@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_dilation_keeps_the_strided_receptive_fields(c4_size):
    strided = receptive_field_table(DilatedNet(downsample="strided", c4_size=c4_size))
    dilated = receptive_field_table(DilatedNet(downsample="dilated", c4_size=c4_size))
    assert [r["rout"] for r in strided[:-1]] == [r["rout"] for r in dilated[:-1]]


def test_registered_and_trains():
    assert MODELS["dilated"] is DilatedNet
    model = MODELS["dilated"](downsample="dilated")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rejects_unknown_downsample_and_c4_size():
    with pytest.raises(ValueError):
        DilatedNet(downsample="pooled")
    with pytest.raises(ValueError):
        DilatedNet(c4_size=2)


@pytest.mark.parametrize("downsample", VARIANTS)
@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_second_skip_wraps_every_third_conv_that_keeps_the_size(downsample, c4_size):
    one = DilatedNet(downsample=downsample, c4_size=c4_size, skips=1)
    two = DilatedNet(downsample=downsample, c4_size=c4_size, skips=2)
    assert n_params(one) == n_params(two)
    for block in two.blocks:
        third = block[2]
        keeps_size = all(c.stride[0] == 1 for c in convs(third))
        assert isinstance(third, Residual) == keeps_size
    same_size = sum(isinstance(b[2], Residual) for b in two.blocks)
    assert same_size == {"dilated": 4, "strided": {4: 1, 8: 2, 16: 3}[c4_size]}[downsample]
    # the skip adds the input to what the conv computes
    two.eval()
    last = two.blocks[-1][2]
    x = torch.randn(2, convs(last)[0].in_channels, 8, 8)
    assert torch.allclose(last(x), x + last.body(x))
    # and the receptive fields, the assignment's rule, are the same
    assert [r["rout"] for r in receptive_field_table(one)] == [r["rout"] for r in receptive_field_table(two)]


def test_silu_swaps_every_relu():
    relu, silu = DilatedNet(), DilatedNet(activation="silu")
    count = sum(isinstance(m, nn.ReLU) for m in relu.modules())
    assert count == sum(isinstance(m, nn.SiLU) for m in silu.modules()) > 0
    assert not any(isinstance(m, nn.ReLU) for m in silu.modules())
    assert n_params(relu) == n_params(silu)


def test_rejects_unknown_skips_and_activation():
    with pytest.raises(ValueError):
        DilatedNet(skips=3)
    with pytest.raises(ValueError):
        DilatedNet(activation="tanh")


@pytest.mark.parametrize("downsample", VARIANTS)
@pytest.mark.parametrize("c4_size", C4_SIZES)
def test_squeeze_excite_ends_every_block_within_the_assignments_rules(downsample, c4_size):
    # the former net is the one whose budget leaves room for the gates
    plain = DilatedNet(downsample=downsample, c4_size=c4_size, **FORMER_NET)
    gated = DilatedNet(downsample=downsample, c4_size=c4_size, se_reduction=16, **FORMER_NET)
    assert all(isinstance(b[-1], SqueezeExcite) for b in gated.blocks)
    assert not any(isinstance(m, SqueezeExcite) for m in plain.modules())
    # the gates' parameters: two linear layers per block, widths (32, 64, 128, 144)
    gates = sum(2 * c * (c // 16) + c // 16 + c for c in (32, 64, 128, 144))
    assert n_params(gated) == n_params(plain) + gates < 200_000
    assert not any(isinstance(m, nn.MaxPool2d) for m in gated.modules())
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in gated.modules()) == 1
    rows = receptive_field_table(gated)
    assert [r["rout"] for r in rows] == [r["rout"] for r in receptive_field_table(plain)]
    assert gated(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_squeeze_excite_scales_each_channel_by_its_gate():
    """Against the paper's formula: x_c * sigmoid(W2 relu(W1 z + b1) + b2)_c, z the channel means."""
    torch.manual_seed(0)
    se = SqueezeExcite(24, 4)
    x = torch.randn(3, 24, 5, 7)
    (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in se.gate if isinstance(m, nn.Linear)]
    assert w1.shape == (6, 24) and w2.shape == (24, 6)
    z = x.reshape(3, 24, -1).mean(-1)
    gate = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    assert torch.allclose(se(x), x * gate[:, :, None, None], atol=1e-6)
    # the gate depends on the whole map: moving one pixel of a channel changes every pixel's scale
    y = x.clone()
    y[:, :, 0, 0] += 10
    assert not torch.allclose(se(y)[:, :, 4, 6], se(x)[:, :, 4, 6])


def test_rejects_a_negative_se_reduction():
    with pytest.raises(ValueError):
        DilatedNet(se_reduction=-1)


def spatial_convs(model):
    """The 3x3 convs, in order: full ones, and the depthwise halves of separable ones."""
    return [c for c in convs(model) if c.kernel_size == (3, 3)]


def full_and_separable(model):
    """How many 3x3 convs see every input channel, and how many are depthwise."""
    kernels = spatial_convs(model)
    return sum(c.groups == 1 for c in kernels), sum(c.groups == c.in_channels > 1 for c in kernels)


@pytest.mark.parametrize("full_convs", [0, 3, 5, 11])
def test_full_convs_counts_the_full_convs_from_the_input(full_convs):
    model = DilatedNet(full_convs=full_convs)
    assert full_and_separable(model) == (full_convs, 12 - full_convs)
    # they come first: a full conv never follows a separable one
    kinds = [c.groups == 1 for c in spatial_convs(model)]
    assert kinds == sorted(kinds, reverse=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # the 1x1 convs add rows to the table but no reach: the receptive field stays the same
    assert receptive_field_table(model)[-1]["rout"] == receptive_field_table(DilatedNet())[-1]["rout"]


def test_the_default_is_c2_separable_and_wider():
    """The validation search's choice: only C1's three convs full, widths 38-171; the net before
    it (five full convs, width 32) is what checkpoints without the flags rebuild."""
    new, old = DilatedNet(), DilatedNet(**FORMER_NET)
    assert full_and_separable(new) == (3, 9) and full_and_separable(old) == (5, 7)
    assert [c.out_channels for c in convs(new) if c.kernel_size == (1, 1)][-1] == 171
    assert n_params(old) == 190_410


def test_fewer_full_convs_buy_width_within_the_budget():
    """Making C2 separable frees enough parameters for 19% more width under 200k."""
    old, narrow = DilatedNet(**FORMER_NET), DilatedNet(width=32, full_convs=3)
    assert n_params(narrow) < n_params(old) < n_params(DilatedNet()) < 200_000
    with pytest.raises(ValueError):
        DilatedNet(full_convs=12)

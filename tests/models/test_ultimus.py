import math

import pytest
import torch
from torch import nn

from core.models import MODELS
from core.models.ultimus import UltimusBlock, UltimusNet

# (layer class, output shape without batch, params) of the assignment's torchsummary table.
BLOCK_ROWS = [("Linear", [8], 384)] * 3 + [("Linear", [48], 432), ("UltimusBlock", [48], 0)]
SEED_TABLE = (
    [("Conv2d", [16, 30, 30], 448), ("Conv2d", [32, 28, 28], 4640),
     ("Conv2d", [48, 26, 26], 13872), ("AvgPool2d", [48, 1, 1], 0)]
    + BLOCK_ROWS * 4
    + [("Linear", [10], 490)]
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def summary_rows(model, x):
    """torchsummary's hook table: every module but containers and the model, in call order."""
    rows, hooks = [], []

    def hook(module, inputs, output):
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((type(module).__name__, list(output.shape[1:]), own))

    for m in model.modules():
        if not isinstance(m, (nn.Sequential, nn.ModuleList)) and m is not model:
            hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


def test_registered():
    assert MODELS["ultimus"] is UltimusNet
    assert isinstance(MODELS["ultimus"](), UltimusNet)


def test_total_params():
    assert n_params(UltimusNet()) == 25_786
    assert n_params(UltimusNet(residual=True)) == 25_786


def test_linear_layers():
    shapes = [(m.in_features, m.out_features, m.bias is not None)
              for m in UltimusNet().modules() if isinstance(m, nn.Linear)]
    assert shapes.count((48, 8, False)) == 12
    assert shapes.count((8, 48, True)) == 4
    assert shapes.count((48, 10, True)) == 1
    assert len(shapes) == 17


def test_block_params():
    model = UltimusNet()
    assert len(model.blocks) == 4
    for block in model.blocks:
        assert n_params(block) == 1_584


def test_summary_table_matches_seed():
    torch.manual_seed(0)
    assert summary_rows(UltimusNet().eval(), torch.randn(2, 3, 32, 32)) == SEED_TABLE


def test_stage_shapes():
    torch.manual_seed(0)
    model, n = UltimusNet().eval(), 5
    x = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        x = model.conv1(x)
        assert x.shape == (n, 16, 30, 30)
        x = model.conv2(x)
        assert x.shape == (n, 32, 28, 28)
        x = model.conv3(x)
        assert x.shape == (n, 48, 26, 26)
        f = model.features(torch.randn(n, 3, 32, 32))
        assert f.shape == (n, 48)
        for block in model.blocks:
            f = block(f)
            assert f.shape == (n, 48)
        assert model(torch.randn(n, 3, 32, 32)).shape == (n, 10)


def test_features_are_relu_convs_then_gap():
    torch.manual_seed(0)
    model = UltimusNet().eval()
    x = torch.randn(3, 3, 32, 32)
    relu = nn.functional.relu
    with torch.no_grad():
        h = relu(model.conv3(relu(model.conv2(relu(model.conv1(x))))))
        assert torch.allclose(model.features(x), h.mean(dim=(2, 3)), atol=1e-6)


def einsum_block(block, x):
    k, q, v = x @ block.k.weight.T, x @ block.q.weight.T, x @ block.v.weight.T
    s = torch.einsum("ni,nj->nij", q, k) / math.sqrt(8)
    am = torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)  # softmax over i
    z = torch.einsum("ni,nij->nj", v, am)
    return z @ block.out.weight.T + block.out.bias, am


def test_block_matches_einsum_reference():
    torch.manual_seed(0)
    block = UltimusBlock().double()
    for p in block.parameters():  # larger weights so the softmax is far from uniform
        nn.init.normal_(p, std=0.5)
    x = torch.randn(7, 48, dtype=torch.float64)
    ref, ref_am = einsum_block(block, x)
    with torch.no_grad():
        out = block(x)
        am = block.attention(block.k(x), block.q(x))
    assert torch.allclose(am, ref_am, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)


def test_softmax_dimension():
    torch.manual_seed(0)
    block = UltimusBlock().double()
    for p in block.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(6, 48, dtype=torch.float64)
    with torch.no_grad():
        am = block.attention(block.k(x), block.q(x))
        v = block.v(x)
        z = torch.bmm(v.unsqueeze(1), am).squeeze(1)
    assert am.shape == (6, 8, 8)
    ones = torch.ones(6, 8, dtype=torch.float64)
    assert torch.allclose(am.sum(dim=1), ones)  # documented dim: sum over i
    assert not torch.allclose(am.sum(dim=2), ones)  # the other dim is not normalised
    # so each Z[n, j] is a convex combination of v[n, :]
    assert (z <= v.max(dim=1, keepdim=True).values + 1e-12).all()
    assert (z >= v.min(dim=1, keepdim=True).values - 1e-12).all()


def test_residual_differs_only_by_skip():
    torch.manual_seed(0)
    exact, res = UltimusNet().eval(), UltimusNet(residual=True).eval()
    res.load_state_dict(exact.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = exact.features(x)
        h_exact, h_res = f, f
        for block in exact.blocks:
            h_exact = block(h_exact)
            h_res = h_res + block(h_res)
        assert torch.equal(exact(x), exact.fc(h_exact))
        assert torch.equal(res(x), res.fc(h_res))
        assert not torch.allclose(exact(x), res(x))
    assert summary_rows(res, x) == SEED_TABLE


@pytest.mark.parametrize("residual", [False, True])
def test_backward(residual):
    torch.manual_seed(0)
    model = UltimusNet(residual=residual)
    loss = nn.functional.cross_entropy(model(torch.randn(3, 3, 32, 32)), torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("init", ["kaiming", "xavier", "orthogonal"])
def test_each_init_redraws_every_weight_with_the_gain_of_what_follows(init):
    torch.manual_seed(0)
    default = UltimusNet()
    torch.manual_seed(0)
    model = UltimusNet(init=init)
    assert n_params(model) == 25_786
    for (name, p), (_, q) in zip(model.named_parameters(), default.named_parameters()):
        if name.endswith("bias"):
            assert not p.any(), name
            continue
        assert not torch.equal(p, q), name
        fan_in = p[0].numel()
        gain = math.sqrt(2) if p.dim() == 4 else 1.0  # the convs feed a ReLU
        # He's std is gain / sqrt(fan_in); Glorot's and the orthogonal rows' depend on both fans
        if init == "kaiming":
            assert p.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.25), name
        elif init == "orthogonal":
            rows = p.flatten(1)
            small = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
            assert torch.allclose(small, gain ** 2 * torch.eye(len(small)), atol=1e-4), name
        else:
            fan_out = p.shape[0] * p[0, 0].numel()
            assert p.std().item() == pytest.approx(gain * math.sqrt(2 / (fan_in + fan_out)), rel=0.25), name


def test_the_default_init_is_pytorchs_own_draw():
    torch.manual_seed(3)
    a = UltimusNet()
    torch.manual_seed(3)
    b = UltimusNet(init="torch")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.slow
def test_he_init_passes_far_more_of_the_per_image_signal_through_the_blocks():
    """Why --init exists: the net has no normalization, and with PyTorch's default draw the
    images' differences (the spread of the GAP features across a batch) shrink by orders of
    magnitude on their way through the four blocks; He's draw keeps far more of them."""
    x = torch.randn(256, 3, 32, 32)

    def kept(init, seed):
        torch.manual_seed(seed)
        model = UltimusNet(init=init)
        with torch.no_grad():
            h = model.features(x)
            start = h.std(0).mean()
            for block in model.blocks:
                h = block(h)
        return (h.std(0).mean() / start).item()

    for seed in range(3):
        assert kept("kaiming", seed) > 10 * kept("torch", seed)

"""Grad-CAM against its definition: CAM for a GAP-and-linear net, a NumPy re-derivation on a
small conv net, and a model left exactly as it was."""

import numpy as np
import pytest
import torch
from torch import nn

from core.models import MODELS
from core.report.gradcam import default_cam_layer, grad_cam


class GapNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: the net CAM was defined for."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class SmallNet(nn.Module):
    """A map that is not simply pooled: the gradients vary over positions."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 4, 3, stride=2, padding=1))
        self.head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x):
        return self.head(self.body(x))


def minmax(maps):
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0)


def bilinear(maps, size):
    """NumPy bilinear upsampling with half-pixel centres (align_corners=False)."""
    n, h, w = maps.shape

    def axis(out, inp):
        src = np.clip((np.arange(out) + 0.5) * inp / out - 0.5, 0, inp - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, inp - 1)
        return lo, hi, src - lo
    y0, y1, fy = axis(size, h)
    x0, x1, fx = axis(size, w)
    rows = maps[:, y0] * (1 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


def test_for_a_gap_and_linear_net_grad_cam_is_cam():
    torch.manual_seed(0)
    net = GapNet().eval()
    x = torch.randn(5, 3, 8, 8)
    classes = torch.tensor([0, 1, 2, 3, 1])
    maps = grad_cam(net, x, net.features, classes).numpy()
    features = net.features(x).detach().numpy()
    cam = np.einsum("nk,nkhw->nhw", net.fc.weight.detach().numpy()[classes.numpy()], features)
    np.testing.assert_allclose(maps, minmax(np.maximum(cam, 0)), atol=1e-5)


def test_grad_cam_matches_a_numpy_re_derivation_with_upsampling():
    torch.manual_seed(1)
    net = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    maps = grad_cam(net, x, net.body).numpy()
    activations = net.body(x).detach().requires_grad_(True)
    logits = net.head(activations)
    classes = logits.argmax(1)
    logits.gather(1, classes[:, None]).sum().backward()
    a, g = activations.detach().numpy(), activations.grad.numpy()
    weights = g.mean(axis=(2, 3))
    raw = np.maximum(np.einsum("nk,nkhw->nhw", weights, a), 0)
    np.testing.assert_allclose(maps, minmax(bilinear(raw, 8)), atol=1e-5)
    assert maps.shape == (4, 8, 8) and maps.min() >= 0 and maps.max() <= 1


def test_grad_cam_leaves_the_model_as_it_was():
    torch.manual_seed(2)
    net = GapNet()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grad_cam(net, torch.randn(6, 3, 8, 8), net.features)
    assert net.training, "the mode comes back"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "weights and BN buffers untouched"
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())


def test_a_constant_map_is_all_zeros():
    net = GapNet()
    with torch.no_grad():
        net.fc.weight.fill_(-1.0)  # every channel argues against every class: the ReLU leaves nothing
        net.features[0].bias.fill_(5.0)
    maps = grad_cam(net, torch.zeros(2, 3, 8, 8), net.features)
    assert torch.equal(maps, torch.zeros(2, 8, 8))


@pytest.mark.parametrize("name, size", [("resnet", 4), ("dilated", 8), ("ultimus", 26)])
def test_each_models_default_layer_is_a_spatial_map(name, size):
    model = MODELS[name]()
    seen = {}
    layer = default_cam_layer(model)
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("shape", o.shape))
    maps = grad_cam(model, torch.randn(2, 3, 32, 32), layer)
    handle.remove()
    assert seen["shape"][-2:] == (size, size) and maps.shape == (2, 32, 32)

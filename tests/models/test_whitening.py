"""The whitened prep conv: a plain conv3x3 in another basis, a basis that whitens patches (checked
against NumPy's covariance), and the ResNet that uses it."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.dataset import Split
from core.data.loader import DeviceLoader
from core.models import MODELS
from core.models.fast import FastNet
from core.models.whitening import PatchWhitening, WhitenedConv2d, fit_whitening


def correlated_images(n=40, seed=0):
    """Smooth, colour-correlated images: their patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, 20, 20, generator=g)
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.5, 1.0, 0.5], [0.2, 0.6, 1.0]])
    smooth = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return torch.einsum("dc,nchw->ndhw", mix, smooth) + 0.1 * noise


def numpy_patches(images, k=3):
    """Every k x k patch, flattened channel-major as a conv weight is, by explicit slicing."""
    x = images.numpy().astype(np.float64)
    n, c, h, w = x.shape
    cols = [x[:, ch, i:i + h - k + 1, j:j + w - k + 1] for ch in range(c) for i in range(k) for j in range(k)]
    return np.stack(cols, axis=-1).reshape(-1, c * k * k)


def fitted_layer(eps=1e-2, seed=0):
    layer = WhitenedConv2d(3, 8, eps=eps)
    layer.fit(correlated_images(seed=seed))
    return layer


def test_fitted_basis_is_the_inverse_square_root_of_the_patch_covariance():
    """basis.T @ basis = V diag(1 / (eigenvalue + eps)) V.T = (cov + eps I)^-1, whatever the
    eigenvectors' signs and order."""
    for eps in (0.0, 1e-2):
        layer = fitted_layer(eps)
        cov = np.cov(numpy_patches(correlated_images()), rowvar=False, bias=True)
        want = np.linalg.inv(cov + eps * np.eye(27))
        got = (layer.basis.T @ layer.basis).double().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_projected_patches_have_unit_uncorrelated_components():
    layer = fitted_layer(eps=0.0)
    patches = numpy_patches(correlated_images())
    z = (patches - patches.mean(0)) @ layer.basis.double().numpy().T
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(27), atol=2e-3)


def test_the_layer_is_the_conv3x3_of_its_weight_in_the_basis():
    layer = fitted_layer()
    x = correlated_images(4, seed=1)
    out = layer(x)
    torch.testing.assert_close(out, F.conv2d(x, layer.conv_weight(), padding=1))
    # Re-derived by hand: each output pixel is weight @ basis @ patch, zero padding as a conv's.
    patches = numpy_patches(F.pad(x, (1, 1, 1, 1)))
    want = patches @ (layer.weight.detach().double() @ layer.basis.double()).numpy().T
    got = out.detach().permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_plain_conv3x3_is_reachable():
    """The basis is invertible, so the whitened layer reparametrizes the spec's conv, no more."""
    layer, plain = fitted_layer(), nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(plain.weight.flatten(1).double() @ torch.linalg.inv(layer.basis.double()))
    x = correlated_images(4, seed=2)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-4, atol=1e-4)


def test_unfitted_layer_is_a_plain_conv_with_conv2d_initialization():
    layer = WhitenedConv2d(3, 64)
    assert torch.equal(layer.basis, torch.eye(27))
    bound = 1 / np.sqrt(27)  # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)) over fan-in 27
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound


def test_whitened_resnet_keeps_the_parameter_count_and_saves_the_basis():
    plain, whitened = MODELS["resnet"](), MODELS["resnet"](whiten=True)
    count = sum(p.numel() for p in whitened.parameters())
    assert count == sum(p.numel() for p in plain.parameters())
    assert isinstance(whitened.prep[0], WhitenedConv2d) and type(plain.prep[0]) is nn.Conv2d
    assert set(whitened.state_dict()) - set(plain.state_dict()) == {"prep.0.basis"}
    assert whitened(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fit_whitening_uses_evenly_spaced_images_and_leaves_plain_models_alone():
    """A split sorted by class must not be fitted on its first classes only."""
    images = (correlated_images(30).clamp(-3, 3) * 40 + 128).to(torch.uint8)
    split = Split(images.numpy(), np.repeat(np.arange(3), 10))
    loader = DeviceLoader(split, torch.device("cpu"), 10, [0.5] * 3, [0.25] * 3, train=False)
    model = MODELS["resnet"](whiten=True)
    fit_whitening(model, loader, max_images=10)
    want = WhitenedConv2d(3, 64)
    want.fit(loader.normalize(loader.images[::3]))
    torch.testing.assert_close(model.prep[0].basis, want.basis)
    plain = MODELS["resnet"]()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fit_whitening(plain, loader)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_patch_whitening_filters_are_the_covariance_eigenvectors_over_their_root_and_their_negatives():
    """As against NumPy above: W^T W = (cov + eps I)^-1 for the first half of the filters, whatever
    the eigenvectors' signs and order; the second half is the first negated."""
    eps = 1e-3
    layer = PatchWhitening(3, kernel_size=2, eps=eps)
    layer.fit(correlated_images())
    first, second = layer.weight.detach().double().reshape(24, 12).split(12)
    cov = np.cov(numpy_patches(correlated_images(), k=2), rowvar=False, bias=True)
    want = np.linalg.inv(cov + eps * np.eye(12))
    np.testing.assert_allclose((first.T @ first).numpy(), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    torch.testing.assert_close(second, -first)


def test_patch_whitening_trains_its_bias_alone():
    layer = PatchWhitening()
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["bias"]


def test_fit_whitening_fits_the_racing_nets_patch_whitening():
    images = (correlated_images(30).clamp(-3, 3) * 40 + 128).to(torch.uint8)
    loader = DeviceLoader(Split(images.numpy(), np.repeat(np.arange(3), 10)), torch.device("cpu"), 10,
                          [0.5] * 3, [0.25] * 3, train=False)
    model = FastNet()
    fit_whitening(model, loader, max_images=10)
    want = PatchWhitening()
    want.fit(loader.normalize(loader.images[::3]))
    torch.testing.assert_close(model.whiten.weight, want.weight)

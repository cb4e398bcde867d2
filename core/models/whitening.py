"""Whitening first layers (Page's and airbench's patch whitening), fitted to training patches.

Neighbouring pixels are strongly correlated, so the gradient of a first-layer 3x3 conv is
dominated by a few smooth directions and the fine ones (edges, colour contrasts) learn slowly.
``WhitenedConv2d`` is still an ordinary conv3x3 with the same number of parameters: its filters
are ``weight @ basis``, where the fixed ``basis`` maps a patch onto its principal components,
each rescaled to unit variance. Any conv3x3 is reachable, but SGD now sees every patch
direction at the same scale, which preconditions the first layer. ``PatchWhitening`` is the
whitening itself, frozen as a conv's filters (the racing net's first layer).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

WHITENING_IMAGES = 10_000  # enough patches (about nine million) for a 27x27 covariance


@torch.no_grad()
def patch_whitening_basis(images, kernel_size, eps, chunk=500):
    """The (dim, dim) matrix that whitens the ``kernel_size`` patches of ``images`` (normalized,
    (N, C, H, W)), dim = C * kernel_size ** 2: its rows are the eigenvectors of the patches'
    covariance, each over sqrt(eigenvalue + eps). ``eps`` keeps the near-empty directions from
    being amplified into noise. In float64 on the CPU, whatever the images' device."""
    dim = images.shape[1] * kernel_size * kernel_size
    total = torch.zeros(dim, device=images.device)
    outer = torch.zeros(dim, dim, device=images.device)
    count = 0
    for batch in images.float().split(chunk):
        patches = F.unfold(batch, kernel_size).transpose(1, 2).reshape(-1, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    # To the CPU before float64, which Apple's MPS cannot hold; eigh runs on the CPU anyway.
    mean = (total / count).cpu().double()
    cov = outer.cpu().double() / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return eigenvectors.T / (eigenvalues.clamp(min=0) + eps).sqrt()[:, None]


class WhitenedConv2d(nn.Module):
    """A bias-free ``kernel_size`` conv whose weights live in a fixed patch basis.

    ``basis`` is a buffer, saved in the state dict: ``fit`` sets it once from training images,
    and a checkpoint restores it. Until then it is the identity, and the layer is a plain conv.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1, eps=1e-2):
        super().__init__()
        dim = in_channels * kernel_size * kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.eps = kernel_size, padding, eps
        self.weight = nn.Parameter(torch.empty(out_channels, dim))
        # nn.Conv2d's default initialization: the fan-in is the same patch dimension.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("basis", torch.eye(dim))

    def conv_weight(self):
        """The equivalent nn.Conv2d weight, (out, in, k, k)."""
        k = self.kernel_size
        return (self.weight @ self.basis).view(self.out_channels, self.in_channels, k, k)

    def forward(self, x):
        return F.conv2d(x, self.conv_weight(), padding=self.padding)

    @torch.no_grad()
    def fit(self, images):
        """Set ``basis`` from the patch covariance of ``images`` (normalized, (N, C, H, W))."""
        self.basis.copy_(patch_whitening_basis(images, self.kernel_size, self.eps).to(self.basis))

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, eps={self.eps}")


class PatchWhitening(nn.Conv2d):
    """A first conv whose filters are fixed to whiten the image's ``kernel_size`` patches
    (airbench's frozen whitening layer): one filter per principal direction of the patches,
    scaled to unit variance, and its negative, so that the nonlinearity after it passes both
    signs. The filters never train; the bias does. ``fit`` sets the filters from training
    images; until then they are conv2d's random initialization."""

    def __init__(self, in_channels=3, kernel_size=2, eps=5e-4):
        dim = in_channels * kernel_size * kernel_size
        super().__init__(in_channels, 2 * dim, kernel_size, bias=True)
        self.weight.requires_grad_(False)
        self.eps = eps

    @torch.no_grad()
    def fit(self, images):
        k = self.kernel_size[0]
        basis = patch_whitening_basis(images, k, self.eps).to(self.weight)
        filters = basis.view(-1, self.in_channels, k, k)
        self.weight.copy_(torch.cat([filters, -filters]))


def fit_whitening(model, loader, max_images=WHITENING_IMAGES):
    """Fit every whitening layer of ``model`` (WhitenedConv2d, PatchWhitening) to up to
    ``max_images`` evenly spaced images of ``loader`` (a DeviceLoader: a split is often sorted
    by class), normalized as training sees them. Meant for a model whose whitening layer is its
    first, which sees the images."""
    layers = [m for m in model.modules() if isinstance(m, (WhitenedConv2d, PatchWhitening))]
    if layers:
        images = loader.normalize(loader.images[::max(1, -(-len(loader.images) // max_images))])
        for layer in layers:
            layer.fit(images)


def whitening_biases(model):
    """The biases of ``model``'s frozen whitening layers (``PatchWhitening``)."""
    return [m.bias for m in model.modules() if isinstance(m, PatchWhitening)]

"""Batched data augmentation as tensor ops.

Every op takes a whole batch ``x`` of shape (N, C, H, W), draws its per-sample randomness from
``generator`` (which must live on ``x.device``) and runs without a Python loop over images, so
augmentation costs a few kernels per batch on whatever device the data lives on. Ops work on
any dtype (uint8 or normalized float); ``fill`` values are in the same space as ``x``.
"""

import torch

PAD_MODES = ("constant", "reflect", "edge", "symmetric")


def _rand(n, generator, device):
    return torch.rand(n, generator=generator, device=device)


def _randint(high, n, generator, device):
    """``n`` integers uniform in [0, high] inclusive."""
    return torch.randint(0, high + 1, (n,), generator=generator, device=device)


def _padded_to_source(size, padding, mode, device):
    """Map each coordinate of a padded axis to the source coordinate it copies (-1: fill).

    Doing the padding as an index map lets one gather do pad and crop together, for every
    torchvision pad mode, including 'symmetric' which ``F.pad`` lacks.
    """
    s = torch.arange(-padding, size + padding, device=device)
    if mode == "constant":
        return torch.where((s >= 0) & (s < size), s, torch.full_like(s, -1))
    if mode == "edge":
        return s.clamp(0, size - 1)
    if mode == "reflect":
        if padding >= size:
            raise ValueError(f"reflect padding {padding} must be smaller than the image size {size}")
        s = s.abs()
        return torch.where(s >= size, 2 * (size - 1) - s, s)
    if mode == "symmetric":
        if padding > size:
            raise ValueError(f"symmetric padding {padding} must not exceed the image size {size}")
        s = torch.where(s < 0, -s - 1, s)
        return torch.where(s >= size, 2 * size - 1 - s, s)
    raise ValueError(f"unknown padding mode {mode!r}; choose one of {', '.join(PAD_MODES)}")


def random_crop(x, padding=4, mode="reflect", fill=0, generator=None):
    """Pad each image by ``padding`` and crop it back to its size at a random offset.

    Equal, pixel for pixel, to torchvision's ``pad`` then a crop at an offset drawn uniformly
    from [0, 2*padding] on each axis, independently per image.
    """
    n, _, h, w = x.shape
    if padding == 0:
        return x
    dy = _randint(2 * padding, n, generator, x.device)
    dx = _randint(2 * padding, n, generator, x.device)
    rows = _padded_to_source(h, padding, mode, x.device)[dy[:, None] + torch.arange(h, device=x.device)]
    cols = _padded_to_source(w, padding, mode, x.device)[dx[:, None] + torch.arange(w, device=x.device)]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows.clamp(min=0)[:, :, None], cols.clamp(min=0)[:, None, :]]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)
    if mode == "constant":
        outside = (rows < 0)[:, :, None] | (cols < 0)[:, None, :]
        out = out.masked_fill(outside[:, None], fill)
    return out.contiguous()


def hflip(x, p=0.5, generator=None):
    """Mirror each image left-right with probability ``p``."""
    flip = _rand(x.shape[0], generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _box_mask(h, w, top, left, height, width):
    """(N, H, W) boolean mask of one axis-aligned box per image."""
    device = top.device
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    top, left = top[:, None, None], left[:, None, None]
    height, width = height[:, None, None], width[:, None, None]
    return (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)


def cutout(x, size=8, p=1.0, fill=0, generator=None):
    """Fill one ``size`` x ``size`` square, lying wholly inside the image, with ``fill``.

    Applied to each image with probability ``p``. Applied after normalization with fill=0,
    the square takes the dataset mean colour, as in DeVries & Taylor and Page's ResNet recipe.
    """
    n, _, h, w = x.shape
    top = _randint(h - size, n, generator, x.device)
    left = _randint(w - size, n, generator, x.device)
    side = torch.full((n,), size, device=x.device)
    mask = _box_mask(h, w, top, left, side, side)
    mask &= (_rand(n, generator, x.device) < p)[:, None, None]
    return x.masked_fill(mask[:, None], fill)


# Recipes are called as recipe(x, generator, mean, std) on a batch normalized with the dataset's
# per-channel pixel-space (0..1) mean and std, which ops such as gray and mean-fill need.


def resnet_recipe(x, generator=None, mean=None, std=None):
    """The superconvergence assignment's transform: RandomCrop 32 (pad 4), FlipLR, Cutout 8x8.

    Cutout's fill of 0 on the normalized batch is the dataset mean colour."""
    x = random_crop(x, padding=4, mode="reflect", generator=generator)
    x = hflip(x, p=0.5, generator=generator)
    return cutout(x, size=8, p=1.0, fill=0, generator=generator)


def flip_crop_recipe(x, generator=None, mean=None, std=None):
    """Random crop with reflect padding 4 and a horizontal flip: light augmentation for small nets."""
    x = random_crop(x, padding=4, mode="reflect", generator=generator)
    return hflip(x, p=0.5, generator=generator)

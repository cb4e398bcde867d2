"""Batched data augmentation as tensor ops.

Every op takes a whole batch ``x`` of shape (N, C, H, W), draws its per-sample randomness from
``generator`` (which must live on ``x.device``) and runs without a Python loop over images, so
augmentation costs a few kernels per batch on whatever device the data lives on. Ops work on
any dtype (uint8 or normalized float); ``fill`` values are in the same space as ``x``.
"""

import torch
import torch.nn.functional as F

PAD_MODES = ("constant", "reflect", "edge", "symmetric")


def _rand(n, generator, device):
    return torch.rand(n, generator=generator, device=device)


def _randint(high, n, generator, device):
    """``n`` integers uniform in [0, high] inclusive."""
    return torch.randint(0, high + 1, (n,), generator=generator, device=device)


def _padded_to_source(size, padding, mode, device):
    """Map each coordinate of a padded axis to the source coordinate it copies (-1: fill)."""
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


def crop_at(x, dy, dx, padding=4, mode="reflect", fill=0):
    """Pad each image by ``padding`` and crop it back to its size at offsets (dy[i], dx[i]).

    The padding is an index map, so one gather does pad and crop together for every
    torchvision pad mode, including 'symmetric', which ``F.pad`` lacks. The gather lays the
    pixels out channels-last, and the batch comes back so: the layout the models train in on
    every device, with no copy to NCHW and back (and, under torch.compile, no second graph for
    NCHW strides).
    """
    n, _, h, w = x.shape
    rows = _padded_to_source(h, padding, mode, x.device)[dy[:, None] + torch.arange(h, device=x.device)]
    cols = _padded_to_source(w, padding, mode, x.device)[dx[:, None] + torch.arange(w, device=x.device)]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows.clamp(min=0)[:, :, None], cols.clamp(min=0)[:, None, :]]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)
    if mode == "constant":
        outside = (rows < 0)[:, :, None] | (cols < 0)[:, None, :]
        out = out.masked_fill(outside[:, None], fill)
    return out.contiguous(memory_format=torch.channels_last)


def random_crop(x, padding=4, mode="reflect", fill=0, generator=None):
    """Equal, pixel for pixel, to torchvision's ``pad`` then a crop at an offset drawn uniformly
    from [0, 2*padding] on each axis, independently per image."""
    if padding == 0:
        return x
    dy = _randint(2 * padding, x.shape[0], generator, x.device)
    dx = _randint(2 * padding, x.shape[0], generator, x.device)
    return crop_at(x, dy, dx, padding, mode, fill)


def hflip(x, p=0.5, generator=None):
    """Mirror each image left-right with probability ``p``."""
    return _mirror(x, _rand(x.shape[0], generator, x.device) < p)


def alternating_flip(x, first_flips, epoch):
    """Mirror the images whose ``first_flips`` (bools, one per image) say so in even epochs, and
    the others in odd ones, so every image is seen both ways in any two consecutive epochs.

    Keller Jordan's airbench found this beats independent coin flips in short runs: a random
    flip shows an image the same way twice running half the time, which wastes an epoch of it.
    """
    return _mirror(x, first_flips ^ bool(epoch % 2))


def _mirror(x, which):
    """Each image mirrored left-right where ``which`` (one bool per image) is true."""
    return torch.where(which[:, None, None, None], x.flip(3), x)


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


# Albumentations-style ops. Their ``mean`` and ``std`` are the dataset's per-channel pixel-space
# (0..1) statistics: given both, ``x`` is taken to be normalized as (pixel - mean) / std; without
# them, ``x`` is in pixel space (0..1 floats or 0..255 uint8). Ops that need pixel values (gray,
# a constant border, the mean fill) use them to move between the two spaces.

BORDERS = ("reflect", "constant", "edge")


def channel_tensor(values, device):
    """Per-channel statistics as a (1, C, 1, 1) float32 tensor on ``device``."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)


def _normalized(mean, std):
    return mean is not None and std is not None


def _to_pixel(x, mean, std):
    return x * channel_tensor(std, x.device) + channel_tensor(mean, x.device) if _normalized(mean, std) else x


def _from_pixel(x, mean, std):
    return (x - channel_tensor(mean, x.device)) / channel_tensor(std, x.device) if _normalized(mean, std) else x


def _like(values, x):
    """Cast float results back to ``x``'s dtype, rounding and clamping for uint8 images."""
    if x.dtype == torch.uint8:
        return values.round().clamp(0, 255).to(torch.uint8)
    return values.to(x.dtype)


def _uniform(low, high, n, generator, device):
    return low + (high - low) * _rand(n, generator, device)


def _uniform_int(low, high, shape, generator, device):
    """Integers uniform in [low, high] inclusive; ``high`` may be a tensor of per-draw bounds."""
    return low + (_rand(shape, generator, device) * (high - low + 1)).long()


def _mean_fill(x, mean, std):
    """The dataset mean colour in ``x``'s space, (1, C, 1, 1): 0 once normalized, ``mean`` in
    pixel space (x255 for uint8), or the batch's own channel means when no statistics are given."""
    if _normalized(mean, std):
        return torch.zeros(1, x.shape[1], 1, 1, device=x.device)
    if mean is not None:
        return channel_tensor(mean, x.device) * (255 if x.dtype == torch.uint8 else 1)
    return x.float().mean((0, 2, 3)).reshape(1, -1, 1, 1)


def _holes(n, size, holes, heights, widths, generator, device):
    """Each image's hole count (N, 1) and its slots' top, left, height and width (N, max_holes).

    ``holes``, ``heights`` and ``widths`` are inclusive (min, max) ranges; every hole lies wholly
    inside an image of ``size`` (H, W).
    """
    slots = (n, holes[1])
    count = _uniform_int(*holes, (n, 1), generator, device)
    height = _uniform_int(*heights, slots, generator, device)
    width = _uniform_int(*widths, slots, generator, device)
    top = _uniform_int(0, size[0] - height, slots, generator, device)
    left = _uniform_int(0, size[1] - width, slots, generator, device)
    return count, top, left, height, width


def coarse_dropout(x, max_holes=1, max_height=16, max_width=16, min_holes=None, min_height=None,
                   min_width=None, fill="mean", p=0.5, generator=None, *, mean=None, std=None):
    """Albumentations 1.3's CoarseDropout: with probability ``p`` per image, fill a number of holes
    uniform in [min_holes, max_holes], each of a height and width uniform in their inclusive ranges
    and lying wholly inside the image. Unset minimums equal the maximums.

    Every image draws ``max_holes`` boxes and keeps only its first ``count`` of them, so the
    whole batch is masked at once. ``fill`` is a number in ``x``'s space or 'mean'.
    """
    n, _, h, w = x.shape
    holes = (max_holes if min_holes is None else min_holes, max_holes)
    heights = (max_height if min_height is None else min_height, max_height)
    widths = (max_width if min_width is None else min_width, max_width)
    count, top, left, height, width = _holes(n, (h, w), holes, heights, widths, generator, x.device)
    boxes = _box_mask(h, w, top.flatten(), left.flatten(), height.flatten(), width.flatten())
    kept = torch.arange(max_holes, device=x.device) < count
    mask = (boxes.view(n, max_holes, h, w) & kept[:, :, None, None]).any(1)
    mask &= (_rand(n, generator, x.device) < p)[:, None, None]
    value = _mean_fill(x, mean, std) if fill == "mean" else torch.full((), float(fill))
    return torch.where(mask[:, None], _like(value.to(x.device), x), x)


def _source_coords(coords, size, border):
    """Fold source pixel coordinates into the image for ``border``, before bilinear sampling.

    Interpolating a reflect-101 padded image at u equals interpolating the image at u folded
    about the first and last pixel centres, so folding gives OpenCV's BORDER_REFLECT_101 exactly
    (grid_sample's own 'reflection' reflects about the pixel edges when align_corners=False,
    which repeats the edge pixel). Likewise clamping gives BORDER_REPLICATE. 'constant' leaves
    coordinates outside, where grid_sample reads zeros.
    """
    if border == "constant":
        return coords
    if border == "edge" or size == 1:
        return coords.clamp(0, size - 1)
    if border == "reflect":
        period = 2 * (size - 1)
        coords = coords.remainder(period)
        return torch.where(coords > size - 1, period - coords, coords)
    raise ValueError(f"unknown border {border!r}; choose one of {', '.join(BORDERS)}")


def _affine_warp(x, angle_deg, scale, dx, dy, border="reflect", fill=0.0):
    """Warp each float image as albumentations' shift_scale_rotate does with cv2.warpAffine.

    Per image: rotate by ``angle_deg`` (counter-clockwise as displayed) and scale about the
    centre ((W-1)/2, (H-1)/2) in pixel-centre coordinates, then shift by (dx*W, dy*H) pixels.
    Each output pixel samples, bilinearly, the source point the inverse map sends it to; at
    power-of-two sizes such as CIFAR's, the identity warp returns ``x`` bit for bit.
    ``fill`` is the value outside the image for border='constant', in ``x``'s space.
    """
    n, _, h, w = x.shape
    theta = torch.deg2rad(angle_deg)[:, None, None]
    cos, sin, scale = theta.cos(), theta.sin(), scale[:, None, None]
    xs = torch.arange(w, device=x.device)[None, None, :] - ((w - 1) / 2 + dx * w)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None] - ((h - 1) / 2 + dy * h)[:, None, None]
    u = _source_coords((cos * xs - sin * ys) / scale + (w - 1) / 2, w, border)
    v = _source_coords((sin * xs + cos * ys) / scale + (h - 1) / 2, h, border)
    grid = torch.stack([(2 * u + 1) / w - 1, (2 * v + 1) / h - 1], dim=-1).to(x.dtype)

    def sample(t):
        return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if border != "constant":
        return sample(x)
    inside = sample(torch.ones_like(x[:, :1]))  # the weight that falls on the image itself
    return sample(x) + (1 - inside) * fill


def shift_scale_rotate(x, shift_limit=0.0625, scale_limit=0.1, rotate_limit=45, border="reflect",
                       p=0.5, generator=None, *, mean=None, std=None):
    """Albumentations 1.3's ShiftScaleRotate: with probability ``p`` per image, shift by up to
    ``shift_limit`` of the size on each axis, scale by 1 +- ``scale_limit`` and rotate by up to
    ``rotate_limit`` degrees, all uniform, with bilinear sampling.

    ``border`` is 'reflect' (OpenCV's default BORDER_REFLECT_101), 'edge', or 'constant', which
    fills pixel value 0 even on a normalized batch. Images left alone come back bit-exact.
    """
    if border not in BORDERS:
        raise ValueError(f"unknown border {border!r}; choose one of {', '.join(BORDERS)}")
    n, device = x.shape[0], x.device
    angle = _uniform(-rotate_limit, rotate_limit, n, generator, device)
    scale = _uniform(1 - scale_limit, 1 + scale_limit, n, generator, device)
    dx = _uniform(-shift_limit, shift_limit, n, generator, device)
    dy = _uniform(-shift_limit, shift_limit, n, generator, device)
    apply = _rand(n, generator, device) < p
    fill = _from_pixel(torch.zeros(1, x.shape[1], 1, 1, device=device), mean, std)
    warped = _affine_warp(x.float(), angle, scale, dx, dy, border, fill)
    return torch.where(apply[:, None, None, None], _like(warped, x), x)


def to_gray(x, p=0.2, generator=None, *, mean=None, std=None):
    """With probability ``p`` per image, set all three channels to the luma 0.299 R + 0.587 G +
    0.114 B (OpenCV's RGB2GRAY), computed in pixel space so a grayed image stays gray there."""
    pixel = _to_pixel(x.float(), mean, std)
    luma = 0.299 * pixel[:, 0:1] + 0.587 * pixel[:, 1:2] + 0.114 * pixel[:, 2:3]
    gray = _from_pixel(luma.expand_as(pixel), mean, std)
    apply = _rand(x.shape[0], generator, x.device) < p
    return torch.where(apply[:, None, None, None], _like(gray, x), x)


def tta_views(x, flip=False, shift=0):
    """The views of a test batch whose logits evaluation averages.

    Training shows the net mirror images and crops moved by up to 4 pixels, so the mirror image
    and small shifts are in-distribution, and averaging over them cancels part of the net's
    sensitivity to exactly where an object sits. With ``shift``, each view is also moved
    ``shift`` pixels up-left and down-right, reflect-padded as the training crops are.
    """
    views = [x, x.flip(3)] if flip else [x]
    if shift:
        n = len(x)
        offsets = [torch.full((n,), d, dtype=torch.long, device=x.device) for d in (0, 2 * shift)]
        views += [crop_at(view, d, d, padding=shift) for view in views for d in offsets]
    return views

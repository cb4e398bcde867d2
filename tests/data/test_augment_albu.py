import numpy as np
import pytest
import torch

from core.data import augment as A
from core.train.recipes import dilated_augment

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=4, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=gen(seed))


def normalize(x):
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def denormalize(x):
    return x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]


def warp(x, angle=0.0, scale=1.0, dx=0.0, dy=0.0, border="reflect", fill=0.0):
    n = x.shape[0]
    full = lambda v: torch.full((n,), float(v))
    return A._affine_warp(x, full(angle), full(scale), full(dx), full(dy), border, fill)


# shift_scale_rotate


@pytest.mark.parametrize("border", A.BORDERS)
@pytest.mark.parametrize("size", [(32, 32), (16, 64)])
def test_identity_warp_is_exact(border, size):
    x = images(h=size[0], w=size[1])
    assert torch.equal(warp(x, border=border), x)


@pytest.mark.parametrize("border", A.BORDERS)
def test_zero_limits_leave_normalized_images_exact(border):
    x = normalize(images(8))
    y = A.shift_scale_rotate(x, 0, 0, 0, border, p=1.0, generator=gen(), mean=MEAN, std=STD)
    assert torch.equal(y, x)


@pytest.mark.parametrize("angle,k", [(90, 1), (-90, -1), (180, 2)])
def test_quarter_turns_match_rot90(angle, k):
    """Positive angles turn counter-clockwise as displayed, as in albumentations."""
    x = images()
    torch.testing.assert_close(warp(x, angle), torch.rot90(x, k, dims=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("border,np_mode", [("reflect", "reflect"), ("edge", "edge"),
                                            ("constant", "constant")])
def test_integer_shift_is_padding_then_slice(border, np_mode):
    """Right by 5 and up by 3 pixels; np.pad's 'reflect' is OpenCV's BORDER_REFLECT_101."""
    x = images()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (5, 5)), mode=np_mode)
    expected = torch.from_numpy(padded[:, :, 6:6 + 32, 0:32])
    assert torch.equal(warp(x, dx=5 / 32, dy=-3 / 32, border=border), expected)


def test_reflect_border_folds_beyond_one_image_width():
    x = images(w=8)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 0), (0, 12)), mode="reflect")
    assert torch.equal(warp(x, dx=-12 / 8), torch.from_numpy(padded[:, :, :, 12:]))


def test_constant_border_is_pixel_zero_on_a_normalized_batch():
    x = normalize(torch.full((64, 3, 32, 32), 0.7))
    y = A.shift_scale_rotate(x, shift_limit=0.5, scale_limit=0, rotate_limit=0, border="constant",
                             p=1.0, generator=gen(), mean=MEAN, std=STD)
    pixel = denormalize(y)
    assert pixel.min().abs() < 1e-5 and (pixel - 0.7).abs().min() < 1e-5
    assert pixel.min() > -1e-5 and pixel.max() < 0.7 + 1e-5


def test_unselected_images_are_bit_exact_and_p_is_respected():
    x = normalize(images(400))
    y = A.shift_scale_rotate(x, p=0.5, generator=gen(), mean=MEAN, std=STD)
    same = (y == x).flatten(1).all(1)
    changed = (y - x).abs().flatten(1).amax(1) > 1e-3
    assert torch.equal(same, ~changed)
    assert 0.4 < same.float().mean() < 0.6


def test_uint8_images_round_back():
    x = (images() * 255).round().to(torch.uint8)
    y = A.shift_scale_rotate(x, 0, 0, 0, p=1.0, generator=gen())
    assert y.dtype == torch.uint8 and torch.equal(y, x)
    y = A.shift_scale_rotate(x, p=1.0, generator=gen())
    assert y.dtype == torch.uint8 and not torch.equal(y, x)


# coarse_dropout


def test_fixed_size_hole_is_exact_and_inside():
    x = images(50)
    y = A.coarse_dropout(x, max_holes=1, max_height=5, max_width=7, fill=-3.0, p=1.0,
                         generator=gen())
    mask = y == -3.0
    assert torch.equal(mask, mask[:, :1].expand_as(mask))  # all channels alike
    mask = mask[:, 0]
    assert torch.equal(y[~mask[:, None].expand_as(y)], x[~mask[:, None].expand_as(x)])
    for m in mask:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m.sum() == 35 and len(rows) == 5 and len(cols) == 7
        assert rows.max() - rows.min() == 4 and cols.max() - cols.min() == 6


def test_hole_position_and_probability_statistics():
    n, size = 4000, 16
    y = A.coarse_dropout(torch.zeros(n, 3, 32, 32), max_height=size, max_width=size, fill=1.0,
                         p=0.5, generator=gen())
    mask = y[:, 0] == 1
    holed = mask.flatten(1).any(1)
    assert abs(holed.float().mean() - 0.5) < 0.03
    tops = mask[holed].any(2).float().argmax(1)
    lefts = mask[holed].any(1).float().argmax(1)
    for start in (tops, lefts):  # uniform on 0..32-16
        assert start.min() == 0 and start.max() == 32 - size
        assert abs(start.float().mean() - (32 - size) / 2) < 0.3


def test_hole_parameter_statistics():
    n, size = 20000, (32, 24)
    count, top, left, height, width = A._holes(n, size, (1, 4), (2, 9), (3, 12), gen(), "cpu")
    for values, low, high in [(count, 1, 4), (height, 2, 9), (width, 3, 12)]:
        assert values.min() == low and values.max() == high
        assert abs(values.float().mean() - (low + high) / 2) < 0.05 * (high - low)
    assert count.shape == (n, 1) and height.shape == (n, 4)
    for start, extent, limit in [(top, height, 32), (left, width, 24)]:
        room = limit - extent
        assert (start >= 0).all() and (start <= room).all()
        assert start[room == room.max()].max() == room.max()
        assert abs((start / room).mean() - 0.5) < 0.01


def test_hole_count_varies_per_image():
    x = torch.zeros(2000, 1, 32, 32)
    y = A.coarse_dropout(x, max_holes=3, min_holes=0, max_height=1, max_width=1, fill=1.0, p=1.0,
                         generator=gen())
    filled = y.flatten(1).sum(1)
    assert filled.min() == 0 and filled.max() == 3
    assert abs(filled.mean() - 1.5) < 0.1  # one-pixel holes rarely overlap


def test_mean_fill_in_each_space():
    x = images(8)
    kwargs = dict(max_height=8, max_width=8, p=1.0, generator=gen())
    y = A.coarse_dropout(normalize(x), mean=MEAN, std=STD, **kwargs)
    assert (y == 0).all(1).flatten(1).sum(1).eq(64).all()
    y = A.coarse_dropout(x, mean=MEAN, **kwargs)
    assert (y == torch.tensor(MEAN)[:, None, None]).all(1).flatten(1).sum(1).eq(64).all()
    y = A.coarse_dropout(x, **kwargs)
    batch_mean = x.mean((0, 2, 3))[:, None, None]
    assert (y == batch_mean).all(1).flatten(1).sum(1).eq(64).all()


# to_gray


def test_gray_weights_match_numpy():
    x = images(6)
    y = A.to_gray(x, p=1.0, generator=gen())
    r, g, b = x.numpy()[:, 0], x.numpy()[:, 1], x.numpy()[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    for c in range(3):
        np.testing.assert_array_equal(y[:, c].numpy(), luma)


def test_gray_stays_gray_on_a_normalized_batch():
    x = normalize(images(200))
    y = A.to_gray(x, p=0.5, generator=gen(), mean=MEAN, std=STD)
    grayed = ~(y == x).flatten(1).all(1)
    assert 0.4 < grayed.float().mean() < 0.6
    pixel = denormalize(y[grayed])
    torch.testing.assert_close(pixel, pixel[:, :1].expand_as(pixel), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixel[:, 0], A.to_gray(denormalize(x[grayed]), p=1.0)[:, 0],
                               atol=1e-6, rtol=0)


# the recipe and shared behaviour


OPS = [
    lambda x, p, g: A.coarse_dropout(x, p=p, generator=g, mean=MEAN, std=STD),
    lambda x, p, g: A.shift_scale_rotate(x, p=p, generator=g, mean=MEAN, std=STD),
    lambda x, p, g: A.to_gray(x, p=p, generator=g, mean=MEAN, std=STD),
]


@pytest.mark.parametrize("op", OPS)
def test_p_zero_leaves_x_unchanged(op):
    x = normalize(images(8))
    assert torch.equal(op(x, 0.0, gen()), x)
    assert not torch.equal(op(x, 1.0, gen()), x)


def test_recipe_is_deterministic_per_seed():
    x = normalize(images(32))
    first = dilated_augment(x, gen(1), MEAN, STD)
    assert torch.equal(first, dilated_augment(x, gen(1), MEAN, STD))
    assert not torch.equal(first, dilated_augment(x, gen(2), MEAN, STD))
    assert first.shape == x.shape and first.dtype == x.dtype


def test_recipe_fills_holes_with_the_mean_colour_of_a_normalized_batch():
    x = normalize(images(64)) + 5.0  # keep the data away from 0, the normalized mean
    y = dilated_augment(x, gen(), MEAN, STD)
    holes = (y == 0).all(1).flatten(1).sum(1)
    assert set(holes.unique().tolist()) <= {0, 256} and 0 < (holes == 256).sum() < 64


def test_recipe_probabilities_switch_each_op():
    x = normalize(images(64)) + 5.0  # no pixel at 0, the normalized mean: holes are easy to count
    off = dict(ssr_p=0.0, dropout_p=0.0, gray_p=0.0)
    assert torch.equal(dilated_augment(x, gen(), MEAN, STD, flip=False, **off), x)
    holed = dilated_augment(x, gen(), MEAN, STD, flip=False, **{**off, "dropout_p": 1.0})
    assert ((holed == 0).all(1).flatten(1).sum(1) == 256).all()
    gray = dilated_augment(x, gen(), MEAN, STD, flip=False, **{**off, "gray_p": 1.0})
    pixels = gray * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(pixels.amax(1), pixels.amin(1), atol=1e-5)  # R = G = B everywhere
    turned = dilated_augment(x, gen(), MEAN, STD, flip=False, **{**off, "ssr_p": 1.0})
    assert all(not torch.equal(a, b) for a, b in zip(turned, x))
    unturned = dilated_augment(x, gen(), MEAN, STD, flip=False, rotate_limit=0.0, **{**off, "ssr_p": 1.0})
    assert not torch.equal(unturned, turned)


@pytest.mark.parametrize("shift_limit", [0.0, 0.125])
def test_recipe_shift_limit_reaches_shift_scale_rotate(shift_limit):
    x = normalize(images(16))
    off = dict(dropout_p=0.0, gray_p=0.0)
    y = dilated_augment(x, gen(), MEAN, STD, flip=False, ssr_p=1.0, shift_limit=shift_limit, **off)
    expected = A.shift_scale_rotate(x, shift_limit=shift_limit, rotate_limit=15.0, p=1.0, generator=gen(),
                                    mean=MEAN, std=STD)
    assert torch.equal(y, expected)
    default = dilated_augment(x, gen(), MEAN, STD, flip=False, ssr_p=1.0, **off)
    assert not torch.equal(y, default)  # the default, 0.0625, is neither value

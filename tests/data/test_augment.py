"""The ResNet recipe's ops against NumPy's (and torchvision's) pad + crop, flips and cutout."""

import numpy as np
import pytest
import torch

from core.data.augment import alternating_flip, crop_at, cutout, hflip, random_crop
from core.train.recipes import dilated_augment, flip_crop_augment, resnet_augment

NUMPY_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "symmetric": "symmetric"}


def images(n=3, c=3, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def numpy_pad_crop(img, dy, dx, padding, mode, fill):
    kwargs = {"constant_values": fill} if mode == "constant" else {}
    padded = np.pad(img, ((0, 0), (padding, padding), (padding, padding)), mode=NUMPY_MODES[mode], **kwargs)
    return padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "symmetric"])
@pytest.mark.parametrize("padding", [1, 4])
def test_crop_at_every_offset_matches_numpy_pad_then_crop(mode, padding):
    x = images(n=1, h=9, w=11)
    offsets = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    batch = x.expand(len(offsets), -1, -1, -1)
    dy = torch.tensor([o[0] for o in offsets])
    dx = torch.tensor([o[1] for o in offsets])
    out = crop_at(batch, dy, dx, padding, mode, fill=7)
    for i, (oy, ox) in enumerate(offsets):
        expected = numpy_pad_crop(x[0].numpy(), oy, ox, padding, mode, 7)
        np.testing.assert_array_equal(out[i].numpy(), expected, err_msg=f"{mode} offset {(oy, ox)}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "symmetric"])
def test_crop_matches_torchvision_pad_then_crop(mode):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = images(n=1).float()
    for dy, dx in [(0, 0), (8, 8), (3, 6), (8, 0)]:
        ours = crop_at(x, torch.tensor([dy]), torch.tensor([dx]), 4, mode, fill=0)[0]
        theirs = tvf.crop(tvf.pad(x[0], [4], fill=0, padding_mode=mode), dy, dx, 32, 32)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_random_crop_draws_each_offset_uniformly_per_image():
    x = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 32).expand(4000, 1, 32, 32).contiguous()
    out = random_crop(x, padding=4, mode="constant", fill=-100, generator=torch.Generator().manual_seed(1))
    # With a ramp along x, the column offset can be read back off each image's row.
    first = out[:, 0, 16, 16]
    dx = (first - 16 + 4).long()
    counts = torch.bincount(dx, minlength=9)
    assert counts.numel() == 9 and counts.min() > 4000 / 9 * 0.8 and counts.max() < 4000 / 9 * 1.2


def test_random_crop_equals_crop_at_with_the_generators_offsets():
    x = images(n=16)
    out = random_crop(x, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (16,), generator=g)
    dx = torch.randint(0, 9, (16,), generator=g)
    torch.testing.assert_close(out, crop_at(x, dy, dx, 4, "reflect"), rtol=0, atol=0)


def test_hflip_flips_exactly_the_chosen_images():
    x = images(n=2000, h=4, w=4)
    out = hflip(x, p=0.3, generator=torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.25 < flipped.float().mean().item() < 0.35
    assert torch.equal(hflip(x, p=1.0), x.flip(3)) and torch.equal(hflip(x, p=0.0), x)


def test_cutout_fills_one_square_inside_the_image():
    x = torch.ones(3000, 3, 32, 32)
    out = cutout(x, size=8, fill=0, generator=torch.Generator().manual_seed(0))
    holes = out[:, 0] == 0
    assert bool((holes.sum((1, 2)) == 64).all())
    assert bool((out[:, 1:] == out[:, :1]).all()), "every channel gets the same square"
    rows = holes.any(2).float()
    cols = holes.any(1).float()
    tops = rows.argmax(1)
    lefts = cols.argmax(1)
    assert bool((rows.sum(1) == 8).all() & (cols.sum(1) == 8).all())
    assert tops.min() == 0 and tops.max() == 24 and lefts.min() == 0 and lefts.max() == 24
    assert abs(tops.float().mean().item() - 12) < 0.6 and abs(lefts.float().mean().item() - 12) < 0.6


def test_cutout_probability_and_uint8_fill():
    x = torch.full((2000, 3, 32, 32), 200, dtype=torch.uint8)
    out = cutout(x, size=8, p=0.5, fill=0, generator=torch.Generator().manual_seed(0))
    applied = (out == 0).flatten(1).any(1).float().mean().item()
    assert 0.45 < applied < 0.55 and out.dtype == torch.uint8


def test_recipe_is_deterministic_for_a_generator_and_varies_per_sample():
    x = images(n=8).float()
    a = resnet_augment(x, torch.Generator().manual_seed(3))
    b = resnet_augment(x, torch.Generator().manual_seed(3))
    c = resnet_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = resnet_augment(x[:1].expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    assert not all(torch.equal(same[0], same[i]) for i in range(1, 8)), "randomness must be per sample"


@pytest.mark.parametrize("size", [0, 5, 12])
def test_resnet_augment_blanks_one_square_of_its_cutout_size(size):
    """On a constant image crop and flip change nothing, so the zeros are cutout's square alone."""
    out = resnet_augment(torch.ones(500, 3, 32, 32), torch.Generator().manual_seed(0), cutout_size=size)
    holes = out[:, 0] == 0
    assert bool((holes.sum((1, 2)) == size * size).all())
    assert bool((holes.any(2).sum(1) == size).all()), "a square, not any shape of that area"


def test_bad_padding_mode_is_refused():
    with pytest.raises(ValueError, match="unknown padding mode"):
        random_crop(images(n=1), mode="wrap")


def test_alternating_flip_shows_each_image_both_ways_in_any_two_epochs():
    x = images(n=64, h=4, w=4)
    first = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
    seen = [alternating_flip(x, first, epoch) for epoch in range(4)]
    flipped = [(view == x.flip(3)).flatten(1).all(1) for view in seen]
    assert torch.equal(flipped[0], first), "epoch 0 flips the drawn half"
    for a, b in zip(flipped, flipped[1:]):
        assert torch.equal(a, ~b), "consecutive epochs show each image both ways"
    assert all(bool(((view == x) | (view == x.flip(3))).flatten(1).all()) for view in seen)


@pytest.mark.parametrize("recipe", [resnet_augment, flip_crop_augment, dilated_augment])
def test_recipes_without_their_flip_draw_no_mirror_images(recipe):
    """A batch that brightens left to right: without the flip, every output still does. The
    other ops keep the direction: crops and shifts move the ramp, a hole or cutout covers at most
    one end with the mean (the ramp's middle value), and rotations stay small."""
    ramp = torch.linspace(-1.5, 1.5, 32).expand(200, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(0)
    stats = dict(mean=[0.5] * 3, std=[0.25] * 3)

    def rising(out):
        return out[:, 0, 16, -1] > out[:, 0, 16, 0]

    assert bool(rising(recipe(ramp, g, **stats, flip=False)).all())
    assert 0.3 < rising(recipe(ramp, g, **stats)).float().mean().item() < 0.7


def test_flip_crop_without_crop_padding_only_mirrors():
    x = torch.randn(64, 3, 32, 32)
    out = flip_crop_augment(x, torch.Generator().manual_seed(0), crop_padding=0)
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    shifted = flip_crop_augment(x, torch.Generator().manual_seed(0), crop_padding=4)
    assert not bool(((shifted == x) | (shifted == x.flip(3))).flatten(1).all(1).all())

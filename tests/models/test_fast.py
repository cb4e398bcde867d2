"""The racing net: its shape, its fixed BatchNorm scales, and convs that start as the identity."""

import torch
from torch import nn

from core.models.fast import FastNet, conv


def test_the_racing_net_maps_an_image_batch_to_scaled_logits():
    model = FastNet(num_classes=7, widths=(8, 16, 16), logit_scale=0.5)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 7)
    model.logit_scale = 1.0
    torch.testing.assert_close(model(x), 2 * logits)


def test_its_batch_norms_learn_a_shift_but_no_scale():
    norms = [m for m in FastNet().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not n.weight.requires_grad and torch.equal(n.weight, torch.ones_like(n.weight)) and n.bias.requires_grad
               for n in norms)


def test_a_conv_starts_as_the_identity_on_the_channels_it_shares_with_its_input():
    layer = conv(4, 6)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(x)[:, :4], x)
    assert layer(x)[:, 4:].abs().sum() > 0, "the other filters keep conv2d's random start"


def test_every_weight_but_the_whitening_filters_and_the_norm_scales_trains():
    model = FastNet()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"whiten.weight"} | {name for name in frozen if name.endswith(".weight") and "groups" in name}
    assert all(model.get_submodule(name.rsplit(".", 1)[0]).__class__ is nn.BatchNorm2d
               for name in frozen - {"whiten.weight"})

"""The racing net: airbench94's layout (Keller Jordan, 2024), written from its description.

A frozen 2x2 patch-whitening conv (its bias trains), then three groups of two 3x3 convs, each
group max-pooled once, with GELU after every BatchNorm; a 3x3 max-pool to one pixel and a linear
head whose logits are scaled down. The BatchNorms learn no scale, only a shift; every conv starts
as the identity on the channels it shares with its input (dirac initialization), so the deep
stack starts close to a shallow one.
"""

import torch
from torch import nn

from .whitening import PatchWhitening


def batch_norm(channels, momentum=0.4, eps=1e-12):
    """BatchNorm with its scale fixed at 1: only the shift trains."""
    norm = nn.BatchNorm2d(channels, momentum=momentum, eps=eps)
    norm.weight.requires_grad_(False)
    return norm


def conv(c_in, c_out):
    """A bias-free 3x3 conv that keeps the size, starting as the identity on its first c_in
    output channels."""
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(layer.weight[:c_in])
    return layer


class ConvGroup(nn.Sequential):
    """conv, 2x2 max-pool, BN, GELU, conv, BN, GELU: one halving of the image side."""

    def __init__(self, c_in, c_out):
        super().__init__(conv(c_in, c_out), nn.MaxPool2d(2), batch_norm(c_out), nn.GELU(),
                         conv(c_out, c_out), batch_norm(c_out), nn.GELU())


class FastNet(nn.Module):
    """``widths``: the three groups' channels; ``logit_scale`` multiplies the head's output."""

    def __init__(self, num_classes=10, widths=(64, 256, 256), logit_scale=1 / 9):
        super().__init__()
        self.whiten = PatchWhitening(3, kernel_size=2)
        self.groups = nn.Sequential(ConvGroup(self.whiten.out_channels, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.pool = nn.MaxPool2d(3)  # 31 -> 15 -> 7 -> 3 after the groups: one pixel left
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x):
        x = self.groups(nn.functional.gelu(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale

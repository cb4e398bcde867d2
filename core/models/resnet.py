"""The custom ResNet of the superconvergence assignments (David Page's ResNet-9 layout).

PrepLayer 64 -> Layer1 128 (+ResBlock) -> Layer2 256 -> Layer3 512 (+ResBlock) -> MaxPool 4 -> FC.
Each downsampling layer is conv -> MaxPool 2 -> BN -> ReLU, pooling before BN as the spec says.
Convs have no bias (the BN that follows would cancel it), which gives the seed's 6,573,130
parameters. Softmax lives in the loss.
"""

from functools import partial

from torch import nn

from .norm import GhostBatchNorm2d
from .whitening import WhitenedConv2d


def batch_norm(channels, ghost_batch=0, frozen_scale=False):
    """BatchNorm2d (or its ghost variant); ``frozen_scale`` fixes the scales at 1, untrained.

    Page's bag of tricks fixes them. Learned, they mostly shrink together under weight decay, and
    before a ReLU a positive per-channel scale is nearly redundant: the next conv can absorb it,
    except where a residual sum mixes two branches.
    """
    norm = GhostBatchNorm2d(channels, ghost_batch) if ghost_batch else nn.BatchNorm2d(channels)
    norm.weight.requires_grad_(not frozen_scale)
    return norm


def activation(celu_alpha=0.0):
    """The spec's ReLU, or CELU(alpha) for ``celu_alpha`` > 0: Page's bag of tricks found the
    smooth activation trains better with ghost batch norm."""
    return nn.CELU(celu_alpha, inplace=True) if celu_alpha else nn.ReLU(inplace=True)


def conv_bn(c_in, c_out, norm=batch_norm, pool=False, whiten=False, act=activation):
    conv = WhitenedConv2d(c_in, c_out) if whiten else nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
    layers = [conv]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [norm(c_out), act()]
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two conv-BN-ReLU units (CELU with ``celu_alpha``) whose output is added to the block's input."""

    def __init__(self, channels, norm=batch_norm, act=activation):
        super().__init__()
        self.res = nn.Sequential(conv_bn(channels, channels, norm, act=act), conv_bn(channels, channels, norm, act=act))

    def forward(self, x):
        return x + self.res(x)


class CustomResNet(nn.Module):
    """``logit_scale`` multiplies the logits (Page's trick: 0.125 keeps the initial softmax
    soft, so high peak LRs do not blow up the first steps); it has no parameters.
    ``ghost_batch`` > 0 swaps every BatchNorm2d for a GhostBatchNorm2d over slices of that
    many images; the parameters and the evaluation-time network are unchanged.
    ``whiten`` makes the prep conv a WhitenedConv2d: the same conv3x3 and parameter count,
    learning in a whitened patch basis that ``fit_whitening`` sets from the training images.
    ``freeze_bn_scale`` keeps every BN scale at 1 (still counted, no longer trained).
    ``celu_alpha`` > 0 swaps every ReLU for CELU(alpha), a variant of the spec's architecture."""

    def __init__(self, num_classes=10, width=64, logit_scale=0.125, ghost_batch=0, whiten=False,
                 freeze_bn_scale=False, celu_alpha=0.0):
        super().__init__()
        w = width
        norm = partial(batch_norm, ghost_batch=ghost_batch, frozen_scale=freeze_bn_scale)
        act = partial(activation, celu_alpha)
        self.prep = conv_bn(3, w, norm, whiten=whiten, act=act)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w, norm, pool=True, act=act), ResBlock(2 * w, norm, act))
        self.layer2 = conv_bn(2 * w, 4 * w, norm, pool=True, act=act)
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w, norm, pool=True, act=act), ResBlock(8 * w, norm, act))
        self.pool = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes)
        self.logit_scale = logit_scale

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.flatten(self.pool(x))) * self.logit_scale

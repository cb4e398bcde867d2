"""C1C2C3C4O: the dilated-convolution assignment's CIFAR-10 net, with no max pooling and under
200k parameters.

Four blocks of three 3x3 convs (plain or depthwise-separable), then GAP and the output layer.
Each block's first conv sets its width and its second is a residual conv; the third may halve
the resolution with stride 2: in C1 and C2 by default (``c4_size`` 8), in C1 alone with
``c4_size`` 16, in C1-C3 in the original net (``c4_size`` 4). The 'dilated' variant strides
nowhere: it keeps every block at 32x32 and doubles the dilation of all later convs at each place
a stride was dropped, which leaves the receptive field of every unit as it was (Yu et al.'s
dilated residual networks). C1's residual conv is dilated in both variants. By default all but
C1's three convs are depthwise-separable, whose parameters grow with c_in + c_out rather than
c_in * c_out: that buys every block a fifth more width within 200k parameters than full convs
in C2 would (the validation search's choice, docs/lab/results.md#the-dilated-net).

Every conv is followed by BN and ReLU (or SiLU, ``activation``). Dropout defaults to off: the
assignment's augmentations already regularize a net of this size so hard that it tends to
underfit. ``skips`` 2 also wraps each block's third conv in an identity skip wherever that conv
keeps the size: a deeper residual path for the same parameters. ``se_reduction`` ends each block
with squeeze-and-excitation (Hu et al.): a per-channel gate computed from the block's whole map,
the one way for these local convs to weigh channels by global context, for few parameters.
"""

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def bn_act(c, activation):
    return [nn.BatchNorm2d(c), ACTIVATIONS[activation](inplace=True)]


def conv(c_in, c_out, stride=1, dilation=1, activation="relu"):
    """3x3 conv, BN, activation; the padding keeps the size at stride 1."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        *bn_act(c_out, activation))


def separable(c_in, c_out, stride=1, dilation=1, activation="relu"):
    """Depthwise 3x3 conv (one filter per channel), pointwise 1x1 conv, BN, activation."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, padding=dilation, dilation=dilation, groups=c_in,
                  bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        *bn_act(c_out, activation))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class SqueezeExcite(nn.Module):
    """Scales each channel by a gate in (0, 1) computed from the channels' spatial means through
    a bottleneck of ``channels // reduction`` units (Hu et al., Squeeze-and-Excitation Networks)."""

    def __init__(self, channels, reduction):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]


CONVS_PER_BLOCK, BLOCKS = 3, 4
# Full convs while channels are few, depthwise-separable ones where they are many: by default
# C1's three (until 2026-12-05 C2's first two as well). Fewer full convs free parameters for width.
FULL_CONV_COUNTS = range(CONVS_PER_BLOCK * BLOCKS)  # the assignment asks for a separable conv


def block_units(full_convs):
    """Each block's three conv kinds: the first ``full_convs`` convs of the net full, the rest
    depthwise-separable."""
    kinds = [conv if i < full_convs else separable for i in range(CONVS_PER_BLOCK * BLOCKS)]
    return [tuple(kinds[i:i + CONVS_PER_BLOCK]) for i in range(0, len(kinds), CONVS_PER_BLOCK)]


def block(c_in, c_out, units, stride, dilation, inner_dilation, unit_kwargs, skips, se_reduction):
    """A conv to c_out, a residual conv, then the conv that strides (or, at stride 1, does not;
    with ``skips`` 2 it is then residual too), then squeeze-and-excitation if ``se_reduction``."""
    first, second, third = units
    last = third(c_out, c_out, stride, dilation=dilation, **unit_kwargs)
    layers = [first(c_in, c_out, dilation=dilation, **unit_kwargs),
              Residual(second(c_out, c_out, dilation=dilation * inner_dilation, **unit_kwargs)),
              Residual(last) if skips == 2 and stride == 1 else last]
    return nn.Sequential(*layers, *([SqueezeExcite(c_out, se_reduction)] if se_reduction else []))


# C4's side -> how many times the blocks halve the 32x32 input, each by one block's last conv
HALVINGS = {4: 3, 8: 2, 16: 1}
C4_SIZES = tuple(HALVINGS)
SKIPS = (1, 2)


class DilatedNet(nn.Module):
    """``width`` sets the blocks' channels to (1, 2, 4, 4.5) times it: 197,610 parameters at 38
    with the default ``full_convs`` 3 (190,410 at width 32 with ``full_convs`` 5, the net before).
    ``downsample``: 'strided' (32 -> 16 -> 8 -> ``c4_size`` pixels) or 'dilated' (32x32
    throughout, with the dilations of the strided net's sizes). ``c4_size`` 8 drops C3's stride:
    C4 then sees four times as many positions for the same parameters; 16 drops C2's too.
    ``skips``: identity skips per block, 1 (around the second conv) or 2 (and around the third
    where it keeps the size). ``activation``: 'relu' or 'silu' after every BN. ``se_reduction``:
    0 for none, else squeeze-and-excitation after each block with that bottleneck ratio (16 keeps
    the net of width 32 and ``full_convs`` 5 under 200k parameters, not the default one).
    ``full_convs``: how many of the twelve convs, counted from the input, are full 3x3 convs
    rather than depthwise-separable (at most 11). The output: GAP, then a linear layer (no
    softmax)."""

    def __init__(self, num_classes=10, width=38, downsample="strided", c4_size=8, skips=1, activation="relu",
                 se_reduction=0, full_convs=3):
        super().__init__()
        if downsample not in ("strided", "dilated"):
            raise ValueError(f"downsample must be 'strided' or 'dilated', not {downsample!r}")
        if c4_size not in C4_SIZES:
            raise ValueError(f"c4_size must be one of {C4_SIZES}, not {c4_size!r}")
        if skips not in SKIPS:
            raise ValueError(f"skips must be one of {SKIPS}, not {skips!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
        if se_reduction < 0:
            raise ValueError(f"se_reduction must be 0 (off) or a positive ratio, not {se_reduction!r}")
        if full_convs not in FULL_CONV_COUNTS:
            raise ValueError(f"full_convs must be 0-{FULL_CONV_COUNTS[-1]} (the assignment asks for a "
                             f"depthwise-separable conv), not {full_convs!r}")
        unit_kwargs = dict(activation=activation)
        widths = (width, 2 * width, 4 * width, 9 * width // 2)
        strided = downsample == "strided"
        halvings = HALVINGS[c4_size]
        blocks, c_in = [], 3
        for i, (c_out, units) in enumerate(zip(widths, block_units(full_convs))):
            stride = 2 if strided and i < halvings else 1
            dilation = 1 if strided else 2**min(i, halvings)
            inner_dilation = 2 if i == 0 else 1
            blocks.append(block(c_in, c_out, units, stride, dilation, inner_dilation, unit_kwargs, skips,
                                se_reduction))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.head(self.blocks(x))

"""The ULTIMUS transformer-style network of the assignment (25,786 parameters).

Conv(3->16) -> Conv(16->32) -> Conv(32->48), 3x3, no padding, ReLU, no BN: 32 -> 30 -> 28 -> 26;
AvgPool2d(26) as GAP -> flatten -> 48 features -> 4 x UltimusBlock (48 -> 48) -> Linear(48, 10).
Softmax lives in the loss.

UltimusBlock math, per sample n, for the input x[n] of 48 features (d = 8):

    k = K x,  q = Q x,  v = V x          three Linear(48, 8, bias=False), each of shape (N, 8)
    S[n, i, j]  = q[n, i] * k[n, j] / sqrt(d)       the 8x8 outer product "Q^T K"
    AM[n, i, j] = exp(S[n, i, j]) / sum_i' exp(S[n, i', j])      softmax over i (dim=1)
    Z[n, j]     = sum_i v[n, i] * AM[n, i, j]                     "Z = V AM", row vector times matrix
    out         = O z                    Linear(8, 48) with bias

The softmax runs over i, the index that ``Z = V AM`` sums over, so sum_i AM[n, i, j] = 1 for
every j: each Z[n, j] is a convex combination of v[n, 0..7]. As stored, AM is therefore
column-stochastic (AM[n].T is row-stochastic). Softmax over j instead would make the rows sum
to 1 but the weights that multiply v would not, so Z would not be a convex combination.

``residual=True`` wraps each block as x + block(x); the default (False) is the exact
architecture. ``init`` picks how the weights are drawn (``init_weights``). Submodules are
registered, and run, in the order of the assignment's torchsummary table (Conv2d x3,
AvgPool2d, then per block Linear K, Q, V, Linear out, UltimusBlock, then the final Linear);
ReLU and flatten are functional so they add no rows.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class UltimusBlock(nn.Module):
    def __init__(self, in_features=48, d=8):
        super().__init__()
        self.k = nn.Linear(in_features, d, bias=False)
        self.q = nn.Linear(in_features, d, bias=False)
        self.v = nn.Linear(in_features, d, bias=False)
        self.out = nn.Linear(d, in_features)
        self.d = d

    def attention(self, k, q):
        """AM[n, i, j] = softmax_i(q[n, i] k[n, j] / sqrt(d)); columns sum to 1."""
        scores = q.unsqueeze(2) * k.unsqueeze(1) / math.sqrt(self.d)
        return scores.softmax(dim=1)

    def forward(self, x):
        k, q, v = self.k(x), self.q(x), self.v(x)
        am = self.attention(k, q)
        z = torch.bmm(v.unsqueeze(1), am).squeeze(1)
        return self.out(z)


INITS = ("torch", "kaiming", "xavier", "orthogonal")


def init_weights(model, init):
    """Re-draw every conv and linear weight by ``init`` and zero the biases; "torch" keeps
    PyTorch's default draw. The net has no normalization, and with PyTorch's default the images'
    differences (the spread of the GAP features across a batch) shrink by orders of magnitude
    through the four blocks, so the scheme sets how much of them reaches the classifier at the
    start."""
    if init == "torch":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        followed_by_relu = isinstance(m, nn.Conv2d)  # the convs feed a ReLU, the linears nothing
        gain = nn.init.calculate_gain("relu" if followed_by_relu else "linear")
        if init == "kaiming":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if followed_by_relu else "linear")
        elif init == "xavier":
            nn.init.xavier_normal_(m.weight, gain=gain)
        else:
            nn.init.orthogonal_(m.weight, gain=gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class UltimusNet(nn.Module):
    def __init__(self, num_classes=10, residual=False, num_blocks=4, init="torch"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3)
        self.conv3 = nn.Conv2d(32, 48, kernel_size=3)
        self.gap = nn.AvgPool2d(26)
        self.blocks = nn.ModuleList(UltimusBlock(48, 8) for _ in range(num_blocks))
        self.fc = nn.Linear(48, num_classes)
        self.residual = residual
        init_weights(self, init)

    def features(self, x):
        """The 48 GAP features of a (N, 3, 32, 32) batch."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.gap(x).flatten(1)

    def forward(self, x):
        x = self.features(x)
        for block in self.blocks:
            x = x + block(x) if self.residual else block(x)
        return self.fc(x)

"""Ghost batch norm: batch statistics over small slices of the batch while training.

At batch 512 the batch statistics are nearly noise-free; normalizing each slice of 32 images by
its own mean and variance puts back the noise that regularizes small-batch training (Page's
"bag of tricks" for ResNet-9). Evaluation is ordinary BatchNorm with the running statistics.
"""

import torch
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from slices of ``ghost_batch`` images.

    The running statistics are the averages over the slices of their means and unbiased
    variances, so evaluation normalizes with the statistics the layer trained on, not with
    the whole batch's (whose variance also holds the spread between slices). The state dict
    is BatchNorm2d's, so a checkpoint loads into either class.
    """

    def __init__(self, num_features, ghost_batch=32, **kwargs):
        super().__init__(num_features, **kwargs)
        if ghost_batch < 1:
            raise ValueError(f"ghost_batch must be at least 1, got {ghost_batch}")
        self.ghost_batch = ghost_batch

    def forward(self, x):
        if not self.training or x.shape[0] <= self.ghost_batch:
            return super().forward(x)
        # Whole slices as one (slices, ghost_batch, C, H, W) view, reduced in one pass; a smaller
        # last slice (a batch that is no multiple of ghost_batch) is reduced on its own.
        whole = x.shape[0] // self.ghost_batch * self.ghost_batch
        parts = [x[:whole].unflatten(0, (-1, self.ghost_batch))]
        if whole < x.shape[0]:
            parts.append(x[whole:].unsqueeze(0))
        outputs, means, variances = zip(*(self._normalize_slices(part) for part in parts))
        with torch.no_grad():
            self.num_batches_tracked += 1
            # momentum=None means a cumulative average, as in BatchNorm2d.
            weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(torch.cat(means).mean(0), weight)
            self.running_var.lerp_(torch.cat(variances).mean(0), weight)
        return torch.cat([out.flatten(0, 1) for out in outputs])

    def _normalize_slices(self, slices):
        """(slices, n, C, H, W) normalized per slice and channel, computed in fp32 as BatchNorm
        is under autocast; with each slice's mean and unbiased variance, (slices, C) each."""
        x = slices.float()
        var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.view(1, 1, -1, 1, 1) + self.bias.view(1, 1, -1, 1, 1)
        count = x[0, :, 0].numel()  # values per slice and channel
        with torch.no_grad():
            unbiased = var.flatten(1) * (count / max(count - 1, 1))
        return out.to(slices.dtype), mean.flatten(1).detach(), unbiased

    def extra_repr(self):
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

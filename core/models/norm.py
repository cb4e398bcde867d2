"""Ghost batch norm: batch statistics over small slices of the batch while training.

At batch 512 the batch statistics are nearly noise-free; normalizing each slice of 32 images by
its own mean and variance puts back the noise that regularizes small-batch training (Page's
"bag of tricks" for ResNet-9). Evaluation is ordinary BatchNorm with the running statistics.
"""

import torch
import torch.nn.functional as F
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
        outputs, means, variances = [], [], []
        for chunk in x.split(self.ghost_batch):
            # momentum 1 makes F.batch_norm write the slice's own statistics into the buffers.
            mean = torch.zeros_like(self.running_mean)
            var = torch.ones_like(self.running_var)
            outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, 1.0, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.num_batches_tracked += 1
            # momentum=None means a cumulative average, as in BatchNorm2d.
            weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.lerp_(torch.stack(means).mean(0), weight)
            self.running_var.lerp_(torch.stack(variances).mean(0), weight)
        return torch.cat(outputs)

    def extra_repr(self):
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

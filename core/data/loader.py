"""The images a run trains and tests on, held on the device as uint8 and batched there: the
channel statistics, normalization, and ``DeviceLoader``."""

import numpy as np
import torch

from .augment import alternating_flip, channel_tensor


def channel_stats(images):
    """Per-channel mean and std of uint8 images, in 0..1 pixel space."""
    x = images.reshape(images.shape[0], 3, -1)
    mean = x.mean(axis=(0, 2), dtype=np.float64) / 255
    sq = (x.astype(np.float32) / 255) ** 2
    std = np.sqrt(sq.mean(axis=(0, 2), dtype=np.float64) - mean ** 2)
    return mean.tolist(), std.tolist()


def normalize(images, mean, std):
    """uint8 images (N, 3, H, W) as the models see them: 0..1, minus the channel mean, over its std
    (``mean`` and ``std`` from ``channel_tensor``)."""
    return (images.float() / 255 - mean) / std


class DeviceLoader:
    """Batches of a split held on the device as uint8, normalized (and augmented) per batch.

    Training order comes from ``order_generator`` (a CPU generator: one randperm per epoch);
    augmentation draws from ``aug_generator`` on the device. Saving both generators' states
    between epochs is what makes a resumed run exact.

    ``first_flips`` (one bool per image) replaces the recipe's random flip with
    ``augment.alternating_flip``, which needs the epoch: call ``set_epoch`` before each one, as
    with torch's DistributedSampler.

    ``share`` (r, W): yield only the r-th of W equal slices of every training batch, for one of
    W data-parallel processes. Each process draws and augments the whole batch from the same
    generators, then slices it, so an image is ordered and augmented the same whatever W is.
    """

    def __init__(self, split, device, batch_size, mean, std, *, train, augment=None,
                 order_generator=None, aug_generator=None, channels_last=False, first_flips=None, share=(0, 1)):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.order_generator = order_generator
        self.aug_generator = aug_generator
        self.channels_last = channels_last
        self.first_flips = None if first_flips is None else first_flips.to(device)
        self.epoch = 0
        rank, size = share
        if batch_size % size:
            raise ValueError(f"a batch of {batch_size} cannot be split into {size} equal shares")
        self.share = slice(rank * batch_size // size, (rank + 1) * batch_size // size)
        self.mean, self.std = mean, std
        self._mean, self._std = channel_tensor(mean, device), channel_tensor(std, device)

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def normalize(self, images):
        return normalize(images, self._mean, self._std)

    def __iter__(self):
        if self.train:
            order = torch.randperm(len(self.labels), generator=self.order_generator).to(self.images.device)
        for i in range(len(self)):
            if self.train:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.normalize(self.images[idx]), self.labels[idx]
                if self.first_flips is not None:
                    x = alternating_flip(x, self.first_flips[idx], self.epoch)
                if self.augment is not None:
                    x = self.augment(x, self.aug_generator, self.mean, self.std, flip=self.first_flips is None)
                x, y = x[self.share], y[self.share]
            else:
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                x, y = self.normalize(self.images[sl]), self.labels[sl]
            # Augmentation may hand back either layout (crops come channels-last): give the
            # model the one --channels-last asks for. A no-op when the batch has it already.
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, y

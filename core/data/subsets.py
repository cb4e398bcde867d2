"""Which images a run uses: the fixed class-balanced subsets of --train-subset and
--test-subset, and the validation images --val-split holds out. Training, the range test and
--eval-only all take them here, so a checkpoint's flags find its run's images again."""

import numpy as np

from ..errors import UserError
from .sources import Split


def balanced_subset(labels, n, num_classes):
    """The first ``n`` indices in dataset order with the classes as equal as possible.

    Each class gives its first n // C images, and the first n % C classes one more, so quick
    runs on a subset see every class and always the same images.
    """
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    picks = []
    for c in range(num_classes):
        quota = n // num_classes + (1 if c < n % num_classes else 0)
        picks.append(np.flatnonzero(labels == c)[:quota])
    return np.sort(np.concatenate(picks))


def balanced_split(split, n, num_classes):
    """The fixed class-balanced first ``n`` images of ``split`` (all of them for None)."""
    idx = balanced_subset(split.labels, n, num_classes)
    return Split(split.images[idx], split.labels[idx])


def hold_out(split, n, num_classes):
    """``split`` as (training, validation): the fixed class-balanced first ``n`` images of it are
    the validation set (None for 0), the rest trains. The choice depends on ``n`` and the data
    alone, so every seed and every recipe is compared on the same held-out images."""
    if not n:
        return split, None
    if n >= len(split.labels):
        raise UserError(f"--val-split {n} leaves no training images out of {len(split.labels)}: lower it or "
                        f"enlarge --train-subset")
    held = np.zeros(len(split.labels), dtype=bool)
    held[balanced_subset(split.labels, n, num_classes)] = True
    return Split(split.images[~held], split.labels[~held]), Split(split.images[held], split.labels[held])


def run_images(train, train_subset, val_split, num_classes):
    """(training, validation) images of a run: its --train-subset of ``train``, less the
    --val-split held out of those. Training and --eval-only both take them here, so a
    checkpoint's flags find its run's images again."""
    return hold_out(balanced_split(train, train_subset, num_classes), val_split, num_classes)

"""PNG figures: training curves, the LR schedule, misclassified images, the LR range test.

matplotlib is imported lazily with the Agg backend so training works on headless machines,
and every figure is written to a temporary file and renamed, so a crash leaves no half PNG.
"""

import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)


def plot_curves(history, path):
    """Train and test loss and accuracy per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["test_acc"] for h in history], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_lr_schedule(lrs, momentums, steps_per_epoch, path, title="One-cycle schedule", momentum_label="momentum"):
    """LR (and momentum or beta1, when it cycles) for every optimizer step."""
    plt = _pyplot()
    steps = np.arange(len(lrs))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(steps / steps_per_epoch, lrs, color="tab:blue", label="LR")
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    if momentums is not None:
        ax2 = ax.twinx()
        ax2.plot(steps / steps_per_epoch, momentums, color="tab:orange", label=momentum_label)
        ax2.set_ylabel(momentum_label)
        fig.legend(loc="upper right", bbox_to_anchor=(0.9, 0.88))
    _save(fig, path)


def plot_misclassified(images, true, pred, classes, path):
    """A grid of misclassified test images (uint8, N x 3 x H x W) with true and predicted labels."""
    plt = _pyplot()
    n = len(images)
    cols = 5
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for i, ax in zip(range(n), np.atleast_1d(axes).ravel()):
        ax.imshow(np.asarray(images[i]).transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(f"true: {classes[true[i]]}\npred: {classes[pred[i]]}", fontsize=9)
    fig.suptitle("Misclassified test images")
    _save(fig, path)

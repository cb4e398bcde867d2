"""PNG figures: training curves, the LR schedule, misclassified images, the LR range test.

matplotlib is imported lazily with the Agg backend so training works on headless machines,
and every figure is written to a temporary file and renamed, so a crash leaves no half PNG.
"""

import os

import numpy as np

from ..runs.outputs import temp_path, write_failed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    tmp = temp_path(path, ".png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path, exc, tmp) from None
    finally:
        _pyplot().close(fig)


def plot_curves(history, path):
    """Train, validation (where the run holds one) and test loss and accuracy per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    for split in ("val", "test"):
        # --eval-every skips epochs; runs without a validation split, and older runs, have none
        scored = [h for h in history if h.get(f"{split}_acc") is not None]
        if scored:
            scored_epochs = [h["epoch"] for h in scored]
            ax_loss.plot(scored_epochs, [h[f"{split}_loss"] for h in scored], "o-", label=split)
            ax_acc.plot(scored_epochs, [h[f"{split}_acc"] for h in scored], "o-", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
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


def plot_range_test(lrs, losses, raw_losses, suggestions, bounds, diverged_at, mode, path):
    """The range test's loss against LR, suggestions marked and the diverging tail shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    raw = np.asarray([x if x is not None and np.isfinite(x) else np.nan for x in raw_losses], dtype=float)
    ax.plot(lrs, raw, color="0.75", lw=1, label="raw loss")
    ax.plot(lrs, losses, color="tab:blue", lw=2, label="smoothed loss")
    if mode == "exp":
        ax.set_xscale("log")
    bottom = int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))
    ax.axvspan(lrs[bottom], lrs[-1], color="tab:red", alpha=0.08, label="past the minimum: diverging")
    colours = {"steepest": "tab:green", "valley": "tab:purple", "min_div_2": "tab:olive", "min_div_10": "tab:brown",
               "conservative": "tab:orange"}
    for name, lr in suggestions.items():
        ax.axvline(lr, color=colours.get(name, "k"), ls="--", lw=1.2, label=f"{name}: {lr:.3g}")
    ax.axvline(bounds["lr_min"], color="k", ls=":", lw=1.2, label=f"lr_min: {bounds['lr_min']:.3g}")
    finite = np.asarray(losses, dtype=float)[np.isfinite(losses)]
    top = min(finite.max(), finite[0] + 1.5 * (finite[0] - finite.min()) + 0.05)  # the tail may shoot off
    low = min(finite.min(), np.nanmin(raw))  # the raw loss dips below the smoothed one: keep its turn in view
    ax.set_ylim(low - 0.05 * (top - low), top)
    stop = f", stopped at step {diverged_at} (diverged)" if diverged_at is not None else ""
    ax.set(xlabel="learning rate", ylabel="loss",
           title=f"LR range test: lr_max {bounds['lr_max']:.3g} ({bounds['method']}){stop}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_cyclic_lr(lrs, base_lr, max_lr, path, title):
    """A cyclic LR per iteration, with its two bounds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(lrs, color="tab:blue")
    ax.axhline(base_lr, color="0.5", ls=":", lw=1)
    ax.axhline(max_lr, color="0.5", ls=":", lw=1)
    ax.text(0, max_lr, " max_lr", va="bottom", color="0.4")
    ax.text(0, base_lr, " base_lr", va="bottom", color="0.4")
    ax.set(xlabel="iteration", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(confusion, classes, path):
    """The confusion matrix (rows: true class, columns: predicted), counts in the cells, each
    cell coloured by its share of the row, so a class's errors read at a glance."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n, 0.8 + 0.55 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8 if n <= 12 else 5,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix: {np.trace(counts)}/{counts.sum()} correct")
    _save(fig, path)


def _heat_overlay(picture, cam, alpha=0.45):
    """``picture`` (H, W, 3 uint8) with ``cam`` (H, W in [0, 1]) laid over it in the jet colours."""
    heat = _pyplot().get_cmap("jet")(np.clip(cam, 0, 1))[..., :3]
    return ((1 - alpha) * picture / 255 + alpha * heat).clip(0, 1)


def plot_gradcam(images, true, pred, prob, pred_maps, true_maps, classes, path):
    """Per image (uint8, N x 3 x H x W): the image, the Grad-CAM of the predicted class over it,
    and that of the true class, side by side in one panel titled with both labels and the
    predicted probability (one axes per image: a figure of many small axes is slow to draw)."""
    plt = _pyplot()
    per_row = 3
    rows = max(1, -(-len(images) // per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(4.2 * per_row, 1.75 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in zip(range(len(images)), axes.ravel()):
        picture = np.asarray(images[i]).transpose(1, 2, 0)
        gap = np.ones((picture.shape[0], 2, 3))
        panel = np.concatenate([picture / 255, gap, _heat_overlay(picture, pred_maps[i]), gap,
                                _heat_overlay(picture, true_maps[i])], axis=1)
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(f"true: {classes[true[i]]}, pred: {classes[pred[i]]} ({prob[i]:.2f})\n"
                     f"image | map of pred | map of true", fontsize=7)
    fig.suptitle("Misclassified test images: Grad-CAM of the predicted and of the true class", fontsize=10)
    _save(fig, path)


def plot_image_cam(image, cam, title, path):
    """One image (uint8, 3 x H x W) beside its Grad-CAM overlay."""
    plt = _pyplot()
    picture = np.asarray(image).transpose(1, 2, 0)
    fig, (plain, overlay) = plt.subplots(1, 2, figsize=(4.4, 2.5))
    for ax in (plain, overlay):
        ax.imshow(picture, interpolation="nearest")
        ax.axis("off")
    overlay.imshow(np.asarray(cam), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_time_to_accuracy(points, path, title, zoom_above=None):
    """Test accuracy against wall time per run, one marker per recipe: ``points`` are dicts with
    label, minutes, acc and (optional) std, the spread over seeds drawn as an error bar. Time on
    a log axis: the recipes span minutes to hours. ``zoom_above``: a second panel with only the
    recipes above that accuracy, where the close ones would overlap at the full range."""
    plt = _pyplot()
    panels = 2 if zoom_above is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    for k, ax in enumerate(axes[0]):
        for i, point in enumerate(points):
            if k == 1 and point["acc"] < zoom_above:
                continue
            ax.errorbar(point["minutes"], point["acc"], yerr=point.get("std") or None, fmt="o",
                        color=plt.cm.tab10(i % 10), capsize=3, label=point["label"])
        ax.set_xscale("log")
        lo, hi = min(p["minutes"] for p in points), max(p["minutes"] for p in points)
        ax.set_xticks([t for t in (1, 2, 5, 10, 20, 30, 60, 120, 240) if lo / 1.5 <= t <= hi * 1.5])
        ax.xaxis.set_major_formatter("{x:g}")
        ax.xaxis.set_minor_formatter("")
        ax.set_xlabel("wall time per run (minutes, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title if k == 0 else f"above {zoom_above:g}%")
    axes[0][0].legend(fontsize=7.5, loc="lower right")
    _save(fig, path)

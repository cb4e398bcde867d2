"""What a trained model gets wrong, written at the end of a run and by --eval-only, from the same
predictions as the final test accuracy: the confusion matrix and per-class accuracy, a grid of
misclassified images, and Grad-CAM on some of them."""

import numpy as np
import torch

from ..data.augment import channel_tensor, tta_views
from ..data.loader import normalize
from . import plots
from .gradcam import default_cam_layer, grad_cam

MISCLASSIFIED_SHOWN = 20
GRADCAM_SHOWN = 12


def confusion_matrix(labels, preds, num_classes):
    """Counts (C, C): rows are the true class, columns the predicted one."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion, classes):
    """Class name -> percent of that class's test images predicted right (None for a class absent
    from the test split)."""
    rows = confusion.sum(1)
    return {name: (100 * float(confusion[i, i]) / rows[i] if rows[i] else None) for i, name in enumerate(classes)}


def evenly_spaced(indices, n):
    """At most ``n`` of ``indices`` (in label order), evenly spaced, so every class shows up."""
    return indices[np.linspace(0, len(indices) - 1, min(len(indices), n)).astype(int)]


def format_per_class(per_class, split="test"):
    width = max(len(name) for name in per_class)
    cells = [f"{name:>{width}} {'-' if acc is None else f'{acc:5.1f}%'}" for name, acc in per_class.items()]
    return f"Per-class {split} accuracy:\n" + "\n".join("  " + "   ".join(cells[i:i + 4]) for i in range(0, len(cells), 4))


def write_error_report(out, model, test, preds, classes, mean, std, tta=False, tta_shift=0, split="test"):
    """confusion.png, misclassified.png and gradcam.png in ``out``, the per-class table printed;
    returns the figures for metrics.json (``confusion``, ``per_class_acc``). ``test``: the split
    evaluated, in order (``split`` names it in the table); ``preds``: the evaluation's predictions."""
    labels = test.labels
    confusion = confusion_matrix(labels, preds, len(classes))
    per_class = per_class_accuracy(confusion, classes)
    print(format_per_class(per_class, split))
    plots.plot_confusion(confusion, classes, out / "confusion.png")
    wrong = evenly_spaced(np.flatnonzero(preds != labels), MISCLASSIFIED_SHOWN)
    plots.plot_misclassified(test.images[wrong], labels[wrong], preds[wrong], classes, out / "misclassified.png")
    picks = evenly_spaced(wrong, GRADCAM_SHOWN)
    if len(picks):
        device = next(model.parameters()).device
        x = normalize(torch.from_numpy(test.images[picks]).to(device), channel_tensor(mean, device),
                      channel_tensor(std, device))
        layer = default_cam_layer(model)
        pred_maps = grad_cam(model, x, layer, torch.from_numpy(preds[picks]))
        true_maps = grad_cam(model, x, layer, torch.from_numpy(labels[picks]))
        was_training = model.training
        model.eval()
        with torch.no_grad():  # the probability of the views the evaluation averaged
            views = tta_views(x, flip=tta, shift=tta_shift)
            probs = (sum(model(v).float() for v in views) / len(views)).softmax(1).cpu().numpy()
        model.train(was_training)
        plots.plot_gradcam(test.images[picks], labels[picks], preds[picks], probs[np.arange(len(picks)), preds[picks]],
                           pred_maps.cpu().numpy(), true_maps.cpu().numpy(), classes, out / "gradcam.png")
    return {"confusion": confusion.tolist(), "per_class_acc": per_class}

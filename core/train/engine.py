"""The step and the evaluation every script shares: one optimizer step, one epoch of them,
evaluation with TTA; the epoch loop around them is ``core.train.loop``."""

import math
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from ..data.augment import tta_views
from ..device import autocast
from ..progress import bar as progress_bar
from .distributed import World


def train_step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler):
    """One optimizer step. Returns (loss, logits), detached and still on the device: no host sync."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":  # tells CUDA graphs (--compile reduce-overhead) that a new step begins
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, amp_dtype):
        logits = model(x)
        loss = loss_fn(logits, y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def train_epoch(model, loader, optimizer, schedule, loss_fn, device, amp_dtype, scaler,
                progress=True, log_every=10, desc="train", averages=(), world=World()):
    """Train for one pass over ``loader``, stepping ``schedule`` and each of ``averages`` (a
    ``WeightEMA``, a ``Lookahead``) after every batch.

    Loss and accuracy accumulate on the device; the host reads them only every ``log_every``
    steps for the bar (and to stop a run whose loss is no longer finite), so the GPU queue
    never drains for bookkeeping. Returns the epoch's figures and timing, where
    ``first_step_s`` isolates the first step (warm-up, compilation) from the throughput; under
    torchrun the figures are the whole batch's, summed over the processes (``world``) at the end.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = progress_bar(loader, len(loader), desc, progress)
    start = time.perf_counter()
    first_step_s = None
    for i, (x, y) in enumerate(bar if bar is not None else loader):
        loss, logits = train_step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler)
        schedule.step()
        for average in averages:
            average.update()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if i == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - start
        if (i + 1) % log_every == 0 or i + 1 == len(loader):
            avg = loss_sum.item() / seen
            if not math.isfinite(avg):
                raise NonFiniteLoss(f"the training loss became {avg} at step {i + 1} of the epoch")
            if bar is not None:
                bar.set_postfix_str(f"Loss={avg:.4f} Batch_id={i} Accuracy={100 * correct.item() / seen:.2f} "
                                    f"LR={schedule.current_lr():.5g}", refresh=False)
    loss_sum, correct, seen = world.sum(torch.stack([loss_sum.double(), correct.double(),
                                                     torch.tensor(seen, dtype=torch.float64, device=device)])).tolist()
    synchronize(device)
    if bar is not None:
        bar.close()
    return {"loss": loss_sum / max(seen, 1), "acc": 100 * correct / max(seen, 1),
            "seconds": time.perf_counter() - start, "first_step_s": first_step_s or 0.0, "images": int(seen)}


def padded_batch(x, size):
    """``x`` with zero images appended up to ``size``, in its memory layout: a compiled model
    then sees one batch shape only. Evaluation uses the running BN statistics, so the padding
    changes no other image's logits."""
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(memory_format=layout)
    out[:len(x)] = x
    return out


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, keep_predictions=False, tta=False, tta_shift=0, pad_to=None,
             progress=False):
    """Mean cross-entropy and accuracy over ``loader`` (in order); optionally every prediction.

    ``tta`` averages the logits of each image and its mirror image: a cheap, steady gain.
    ``tta_shift`` also averages shifted copies (see ``tta_views``), for a smaller gain at three
    times the cost. ``pad_to`` pads a smaller last batch to that size (``padded_batch``), for a
    compiled model. ``progress``: a bar on a terminal (evaluation with TTA can take minutes on a CPU).
    """
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    preds = []
    bar = progress_bar(loader, len(loader), "evaluate", progress)
    for x, y in bar if bar is not None else loader:
        if pad_to and len(x) < pad_to:
            x = padded_batch(x, pad_to)
        views = tta_views(x, flip=tta, shift=tta_shift)
        with autocast(device, amp_dtype):
            # in fp32: under autocast each view's logits are bf16 or fp16, whose sum rounds
            logits = sum(model(view).float() for view in views)[:len(y)] / len(views)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        if keep_predictions:
            preds.append(pred)
    if bar is not None:
        bar.close()
    total = len(loader.labels)
    result = {"loss": loss_sum.item() / total, "correct": int(correct.item()), "total": total}
    result["acc"] = 100 * result["correct"] / total
    if keep_predictions:
        result["predictions"] = torch.cat(preds).cpu()
    return result


def recalibrate_bn(model, loader, device, amp_dtype):
    """Re-estimate every BatchNorm's running statistics over ``loader``, in train mode, no steps.

    Training fills the running statistics from augmented batches (cutout blanks a square of
    every image) over its last few dozen steps, and a moving average of the weights averages
    them too, so they may misdescribe clean images or the averaged weights. One pass over
    un-augmented training images, with equal weight per batch, replaces them. Only the running
    statistics change: the parameters and the training trajectory do not. Whether it pays off
    is a measured question, not a given (docs/lab/results.md has the runs).
    """
    with autocast(device, amp_dtype):
        update_bn(loader, model)


def format_test_line(result, split="Test"):
    """The line users know from the assignments' logs (``split`` "Validation" for the held-out one)."""
    return (f"{split} set: Average loss: {result['loss']:.4f}, "
            f"Accuracy: {result['correct']}/{result['total']} ({result['acc']:.2f}%)")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class NonFiniteLoss(RuntimeError):
    """Raised when the loss is NaN or inf: the run stops and keeps its last good checkpoint."""

"""The training engine shared by every script: one step, one epoch, evaluation, and the fit loop."""

import torch

from .device import autocast


def train_step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler):
    """One optimizer step. Returns (loss, logits), detached and still on the device: no host sync."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        logits = model(x)
        loss = loss_fn(logits, y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()

"""Muon: momentum SGD whose update of each weight matrix is orthogonalized (Keller Jordan, 2024).

A conv filter bank's gradient is dominated by a few directions; SGD moves the weights mostly
along them. Muon replaces the (Nesterov) momentum of each matrix-shaped parameter, a conv
weight flattened to (out, in * kh * kw), by the orthogonal factor of its polar decomposition,
U V^T of its SVD U S V^T: every direction moves at the same rate. The factor is approximated by
a few Newton-Schulz iterations, matrix products only, so it runs on any device in any dtype.
"""

import torch

# The quintic iteration's coefficients from Jordan's Muon: chosen for the fastest growth of the
# small singular values, at the price of ending in about [0.7, 1.2] rather than at exactly 1.
QUINTIC = (3.4445, -4.7750, 2.0315)
# The classic cubic iteration: slower, but it converges to the polar factor itself.
CUBIC = (1.5, -0.5, 0.0)
# airbench94's Muon (Jordan, 2024): the filters' momentum, lower than SGD's, and three iterations.
AIRBENCH_MOMENTUM = 0.6
AIRBENCH_STEPS = 3


def newton_schulz(matrix, steps=5, coefficients=QUINTIC, eps=1e-7):
    """An approximation of U V^T for ``matrix`` = U S V^T (2-D), by ``steps`` iterations of
    X <- a X + (b X X^T + c (X X^T)^2) X, started from the matrix scaled to spectral norm at most
    1 (by its Frobenius norm). Each step maps every singular value s to a s + b s^3 + c s^5 and
    leaves the singular vectors alone."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz takes a matrix, not a tensor of shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    x = matrix.float() / (matrix.norm() + eps)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for parameters of two or more dimensions (conv filters, linear weights): each step,
    ``momentum_buffer = momentum * momentum_buffer + grad``; the Nesterov look-ahead
    ``grad + momentum * momentum_buffer`` (or the buffer itself) is flattened to a matrix of one
    row per output unit and orthogonalized by ``newton_schulz``; the weights then move by ``lr``
    times it, scaled by sqrt(max(1, rows / columns)) so that the update's RMS per entry is about
    1/sqrt(columns), one over the fan-in's root, whether the matrix is wide or tall; after a
    decoupled weight decay of ``lr * weight_decay``.

    ``normalize`` first rescales each weight to a Frobenius norm of sqrt(rows), as airbench's
    Muon does: a filter bank followed by BatchNorm computes the same function at any scale, and
    a fixed scale keeps the step's size relative to the weights fixed (no decay is needed then).

    A param group with ``orthogonalize`` False is trained by torch's Nesterov SGD instead (the
    weight decay added to the gradient), so one optimizer holds a whole model: Muon for the
    filters, SGD for the biases and the head, each group at its own LR and momentum.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, steps=5, normalize=False,
                 orthogonalize=True):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or steps < 1:
            raise ValueError(f"invalid Muon settings: lr {lr}, momentum {momentum}, weight_decay {weight_decay}, "
                             f"steps {steps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      steps=steps, normalize=normalize, orthogonalize=orthogonalize))
        for group in self.param_groups:
            for p in group["params"]:
                if group["orthogonalize"] and p.ndim < 2:
                    raise ValueError(f"Muon orthogonalizes matrices; a parameter of shape {tuple(p.shape)} belongs "
                                     f"to a group with orthogonalize=False")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if group["orthogonalize"] or not decay else p.grad.add(p, alpha=decay)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(grad)
                direction = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                if not group["orthogonalize"]:
                    p.add_(direction, alpha=-lr)
                    continue
                matrix = direction.reshape(len(direction), -1)
                update = newton_schulz(matrix, group["steps"]).view_as(p)
                scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                if group["normalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                if decay:
                    p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * scale)
        return loss

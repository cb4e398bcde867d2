"""Running the LR range test for a recipe and keeping what it found: lr_finder.json and .png.

Shared by lr_range_test.py and the train scripts' ``--lr-max find``, so both read the curve
the same way and ``--lr-from`` can reuse either's JSON.
"""

import json
import math

from . import plots
from .errors import UserError
from .lr_finder import METHODS, range_test, suggest, suggest_bounds
from .outputs import write_json


def find_bounds(model, optimizer, loss_fn, loader, device, amp_dtype, out, *, start_lr=1e-5, end_lr=10.0,
                num_iter=100, mode="exp", optimizer_name, method=None, val_loader=None, settings=None):
    """Sweep, suggest lr_max and lr_min, and write ``out``/lr_finder.json and lr_finder.png.

    ``optimizer_name`` ('sgd' or 'adam') picks the default reading; ``method`` overrides it.
    The model and optimizer come back exactly as they were, so training can start right after.
    """
    result = range_test(model, optimizer, loss_fn, loader, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                        mode=mode, val_batches=val_loader, device=device, amp_dtype=amp_dtype)
    try:
        bounds = suggest_bounds(result.lrs, result.losses, optimizer_name, method)
        suggestions = {m: suggest(result.lrs, result.losses, m) for m in METHODS}
    except ValueError as exc:
        raise UserError(f"the LR range test found no usable LR ({exc}); widen --start-lr/--end-lr "
                        f"or raise --num-iter") from None
    record = {**bounds, "suggestions": suggestions, "lrs": result.lrs, "losses": result.losses,
              "raw_losses": [x if math.isfinite(x) else None for x in result.raw_losses],
              "diverged_at": result.diverged_at, "mode": mode, "loss_kind": result.loss_kind,
              "args": settings or {}}
    write_json(out / "lr_finder.json", record)
    plots.plot_range_test(result.lrs, result.losses, result.raw_losses, suggestions, bounds, result.diverged_at,
                          mode, out / "lr_finder.png")
    return record


def load_bounds(path):
    """(lr_max, lr_min) from a saved lr_finder.json."""
    try:
        with open(path) as f:
            record = json.load(f)
        lr_max, lr_min = float(record["lr_max"]), float(record["lr_min"])
    except FileNotFoundError:
        raise UserError(f"--lr-from {path}: no such file; run lr_range_test.py first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--lr-from {path} is not an lr_finder.json ({exc.__class__.__name__}: {exc})") from None
    if not 0 < lr_min < lr_max:
        raise UserError(f"--lr-from {path}: lr_min {lr_min} and lr_max {lr_max} must satisfy 0 < lr_min < lr_max")
    return lr_max, lr_min

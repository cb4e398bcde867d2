"""The runner of ``core.train.lr_finder``'s range test: it sweeps a built run's model and loader,
keeps what it found (lr_finder.json and .png), and turns the flags into the LR bounds a run
trains with.

Shared by lr_range_test.py and the train scripts' ``--lr-max find``, so both read the curve
the same way and ``--lr-from`` can reuse either's JSON.
"""

import contextlib
import dataclasses
import json
import math

from ..errors import UserError
from ..report import plots
from ..runs.outputs import write_json
from .lr_finder import METHODS, range_test, suggest, suggest_bounds


@dataclasses.dataclass(frozen=True)
class LRBounds:
    """The one-cycle bounds a run trains with, and where they came from. A value of its own
    beside the flags: ``--lr-max find`` stays 'find' in the flags, and these hold what it found."""

    lr_max: float
    lr_min: float
    source: str

    def as_dict(self):
        return dataclasses.asdict(self)


def resolve_lr_bounds(training, run, out, model_name, settings, progress):
    """The bounds for a new run of ``model_name`` (``training``: its ``TrainingConfig``): from
    --lr-from's file, a range test run now (--lr-max find, which records ``settings``, the run's
    flags, and draws a bar with ``progress``), or --lr-max and --lr-min as given."""
    if training.lr_from:
        lr_max, lr_min = load_bounds(training.lr_from, model_name, training.optimizer)
        return LRBounds(lr_max, lr_min, f"lr_from:{training.lr_from}")
    if training.lr_max == "find":
        record = find_bounds(run.model, run.optimizer, run.loss_fn, run.train_loader, run.device, run.amp_dtype, out,
                             num_iter=training.num_iter, model_name=model_name, optimizer_name=training.optimizer,
                             settings=settings, progress=progress,
                             advice="give --lr-max and --lr-min instead, or read them off lr_range_test.py with a "
                                    "wider --start-lr/--end-lr and pass its lr_finder.json with --lr-from")
        source = f"range test: lr_max by {record['method']}, lr_min {record['lr_min_method']}; see lr_finder.png"
        return LRBounds(record["lr_max"], record["lr_min"], source)
    return LRBounds(training.lr_max, training.lr_min, "flags")


def checkpoint_bounds(ckpt):
    """The bounds a checkpointed run trained with."""
    return LRBounds(**ckpt["lr_bounds"])


@contextlib.contextmanager
def _generators_restored(loader):
    """Put back the loader's shuffling and augmentation generators after the sweep has drawn from
    them, so that training after ``--lr-max find`` sees the batches it would see without it."""
    generators = [g for g in (getattr(loader, "order_generator", None), getattr(loader, "aug_generator", None))
                  if g is not None]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def find_bounds(model, optimizer, loss_fn, loader, device, amp_dtype, out, *, start_lr=1e-5, end_lr=10.0,
                num_iter=100, mode="exp", model_name, optimizer_name, method=None, val_loader=None, settings=None,
                progress=True, advice):
    """Sweep, suggest lr_max and lr_min, and write ``out``/lr_finder.json and lr_finder.png.

    ``model_name`` and ``optimizer_name`` are recorded, so that --lr-from can refuse the bounds
    for another model or optimizer; ``optimizer_name`` ('sgd', 'adam' or 'adamw') also picks the
    default reading, which ``method`` overrides. ``progress``: a bar, else a line every few steps.
    The model, the optimizer and the loader's generators come back exactly as they were, so
    training right after it is the training the found bounds would get on their own.
    ``settings``: the flags as plain values, recorded in the JSON. ``advice``: what the error for a
    sweep that found no LR tells the user to do, in the flags of the script that ran it.
    """
    with _generators_restored(loader):
        result = range_test(model, optimizer, loss_fn, loader, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                            mode=mode, val_batches=val_loader, device=device, amp_dtype=amp_dtype, progress=progress)
    try:
        bounds = suggest_bounds(result.lrs, result.losses, optimizer_name, method)
        suggestions = {m: suggest(result.lrs, result.losses, m) for m in METHODS}
    except ValueError as exc:
        raise UserError(f"the LR range test found no usable LR ({exc}): {advice}") from None
    record = {"model": model_name, "optimizer": optimizer_name, **bounds, "suggestions": suggestions, "lrs": result.lrs, "losses": result.losses,
              "raw_losses": [x if math.isfinite(x) else None for x in result.raw_losses],
              "diverged_at": result.diverged_at, "mode": mode, "loss_kind": result.loss_kind,
              "args": settings or {}}
    write_json(out / "lr_finder.json", record)
    plots.plot_range_test(result.lrs, result.losses, result.raw_losses, suggestions, bounds, result.diverged_at,
                          mode, out / "lr_finder.png")
    return record


def load_bounds(path, model_name, optimizer_name):
    """(lr_max, lr_min) from a saved lr_finder.json, which must have swept ``model_name`` with
    ``optimizer_name``: another net's or optimizer's bounds would train, just badly."""
    try:
        with open(path) as f:
            record = json.load(f)
        lr_max, lr_min = float(record["lr_max"]), float(record["lr_min"])
        swept, swept_with = record["model"], record["optimizer"]
    except FileNotFoundError:
        raise UserError(f"--lr-from {path}: no such file; run lr_range_test.py first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--lr-from {path} is not an lr_finder.json of this version ({exc.__class__.__name__}: "
                        f"{exc}); run lr_range_test.py again") from None
    if swept != model_name:
        raise UserError(f"--lr-from {path} swept the '{swept}' model, but this script trains '{model_name}': "
                        f"run lr_range_test.py --model {model_name}")
    if swept_with != optimizer_name:
        raise UserError(f"--lr-from {path} swept with --optimizer {swept_with}, but this run trains with "
                        f"{optimizer_name}: pass --optimizer {swept_with}, or sweep again with --optimizer "
                        f"{optimizer_name}")
    if not 0 < lr_min < lr_max:
        raise UserError(f"--lr-from {path}: lr_min {lr_min} and lr_max {lr_max} must satisfy 0 < lr_min < lr_max")
    return lr_max, lr_min

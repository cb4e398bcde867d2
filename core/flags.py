"""What a flag's value may be: argparse value types, the checks that span several flags, the
values a run derives from its flags, and the flags in the plain form a checkpoint can hold.

The parsed flags are never rewritten: what a run derives from them (the LR peak's epoch, the
LR bounds, the output folder) is a value of its own, so a checkpoint's flags stay the flags
the user typed.
"""

import argparse
import math

from .errors import UserError


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def number(text):
    """A finite float: 'nan' and 'inf' would pass every range check below and fail far later."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _bounded_below(parse, strict):
    """``parse`` followed by a check that the value is positive (``strict``) or not negative."""
    def check(text):
        value = parse(text)
        if value < 0 or strict and value == 0:
            raise argparse.ArgumentTypeError(f"{value} must be positive" if strict else f"{value} must not be negative")
        return value
    return check


positive_int = _bounded_below(whole_number, strict=True)
non_negative_int = _bounded_below(whole_number, strict=False)
positive_float = _bounded_below(number, strict=True)
non_negative_float = _bounded_below(number, strict=False)


def below_one(text):
    """A share in [0, 1), such as label smoothing: 1 would smooth the targets into a uniform guess."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value} must be below 1")
    return value


def probability(text):
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} is not a probability (0 to 1)")
    return value


def at_least_two(text):
    value = whole_number(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} must be at least 2")
    return value


# A run seeds the augmentation with seed + 1 and --runs N with seed .. seed + N - 1, and torch's
# generators take 64-bit seeds: this bound leaves room for both.
MAX_SEED = 2 ** 63 - 1


def seed_value(text):
    value = whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} must lie in 0..{MAX_SEED}")
    return value


# The largest float32: the optimizers' kernels convert an LR to the parameters' precision, and a
# larger one overflows there.
MAX_LR = 3.4e38


def learning_rate(text):
    value = positive_float(text)
    if value > MAX_LR:
        raise argparse.ArgumentTypeError(f"{value} is above {MAX_LR:g}, the largest LR a float32 optimizer can apply")
    return value


def lr_or_find(text):
    return "find" if text == "find" else learning_rate(text)


def peak_epoch(args):
    """The epoch at which the one-cycle LR peaks: --max-at-epoch, else the assignments' 5 of 24
    epochs (5/24 of --epochs for shorter runs, so a short run still warms up for a fifth)."""
    return args.max_at_epoch if args.max_at_epoch is not None else min(5.0, args.epochs * 5 / 24)


def validate(args):
    """The checks argparse cannot make one flag at a time."""
    if not 0 < peak_epoch(args) < args.epochs:
        raise UserError(f"--max-at-epoch {peak_epoch(args)} must lie strictly between 0 and --epochs {args.epochs}")
    if args.lr_max != "find" and args.lr_min >= args.lr_max:
        raise UserError(f"--lr-min {args.lr_min} must be below --lr-max {args.lr_max}")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume PATH to the checkpoint to evaluate")
    for flag, given in (("--eval-split val", args.eval_split != "test"), ("--live-weights", args.live_weights)):
        if given and not args.eval_only:
            raise UserError(f"{flag} chooses what --eval-only scores: add --eval-only (and --resume PATH)")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay {args.ema_decay} must lie in [0, 1): 0 turns the average off, 0.99 averages "
                        f"over about 100 steps")
    if args.runs > 1 and args.resume:
        raise UserError("--runs repeats whole runs; resume each run's last.pt on its own instead")


def refuse_contradictions(args, given):
    """Flags typed together (``given``: their dests) that one of them would silently override."""
    if args.lr_from and given & {"lr_max", "lr_min"}:
        typed = " and ".join(f"--{d.replace('_', '-')}" for d in sorted(given & {"lr_max", "lr_min"}))
        raise UserError(f"--lr-from {args.lr_from} gives --lr-max and --lr-min: drop {typed}, or drop --lr-from")
    if args.lr_max == "find" and "lr_min" in given:
        raise UserError("--lr-max find reads --lr-min off the sweep too: drop --lr-min, or give --lr-max as a number")
    if "num_iter" in given and args.lr_max != "find":
        raise UserError("--num-iter sets the length of --lr-max find's sweep: add --lr-max find, or drop --num-iter")


def plain_flags(args):
    """The flags as plain values, fit for a weights_only checkpoint and metrics.json."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}

"""What one flag's value may be: the argparse value types, each a one-line error for a value
out of its range. The flags themselves, and the checks that span several, are
``core.train.config``."""

import argparse
import math


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


def top_k_count(text):
    value = whole_number(text)
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{value} must lie in 1..10")
    return value

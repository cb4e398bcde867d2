"""Command-line flags shared by the train scripts, and the wrapper that turns a UserError into a
one-line message and a non-zero exit instead of a traceback."""

import argparse
import shlex
import sys

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with single-line errors, like the rest of the toolkit's messages."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """With ``--preset NAME``, parsing starts from a namespace holding the preset's values:
        argparse fills in defaults only where the namespace has none, and a flag given on the
        command line still overwrites it, so explicit flags win over the preset."""
        presets = getattr(self, "presets", None)
        if presets and namespace is None:
            known, _ = self.parse_known_args(args)
            if known.preset:
                namespace = argparse.Namespace(**presets[known.preset])
        return super().parse_args(args, namespace)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already explains it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text):
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_int(text):
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def lr_or_find(text):
    return "find" if text == "find" else positive_float(text)


def non_negative_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def add_cache_arg(p):
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where decoded uint8 arrays are cached (default: ~/.cache/cifar-toolkit; 'none' disables)")


def add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="CIFAR-10 source: a folder holding cifar-10-batches-py/, an image folder with "
                        "train/<class>/ and test/<class>/, or a .tar/.tar.gz/.tgz of either "
                        "(default: ./data, downloading the official dataset there if missing)")
    add_cache_arg(g)
    g.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="train on a fixed class-balanced selection of the first N images")
    g.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                   help="evaluate on a fixed class-balanced selection of the first N test images")


def add_device_args(p):
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to train; auto takes CUDA, then MPS, then the CPU")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 on recent GPUs and AMX/AVX512-BF16 CPUs, "
                        "fp16 with loss scaling on older GPUs (T4), else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout, faster for convs with AMP")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and augmentation")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of tqdm bars")


def format_preset(values):
    """A preset as the command-line flags it stands for."""
    flags = []
    for dest, value in values.items():
        flag = "--" + dest.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def build_train_parser(recipe):
    p = ArgumentParser(prog=recipe.script, description=recipe.description)
    add_data_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, help="number of epochs")
    g.add_argument("--batch-size", type=positive_int, help="training batch size")
    g.add_argument("--eval-batch-size", type=positive_int, default=1024, help="evaluation batch size")
    g.add_argument("--lr-max", type=lr_or_find,
                   help="one-cycle peak LR, or 'find' to run the LR range test first and use its suggestion")
    g.add_argument("--lr-min", type=positive_float, help="one-cycle start and end LR (no annihilation)")
    g.add_argument("--lr-from", default=None, metavar="JSON",
                   help="take --lr-max and --lr-min from a saved lr_finder.json")
    g.add_argument("--max-at-epoch", type=positive_float, default=None,
                   help="epoch at which the LR peaks (default: 5, or 5/24 of --epochs when that is fewer)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], help="SGD with Nesterov momentum, or Adam")
    g.add_argument("--cycle-momentum", action=argparse.BooleanOptionalAction,
                   help="run the momentum (Adam: beta1) 0.95 -> 0.85 -> 0.95 against the LR; "
                        "--no-cycle-momentum keeps it at 0.9")
    g.add_argument("--weight-decay", type=non_negative_float, help="L2 weight decay")
    g.add_argument("--bias-lr-scale", type=positive_float, default=1.0, metavar="K",
                   help="train biases (BN shifts, the FC bias) at K times the LR with weight decay / K "
                        "(Page's bag of tricks: 64)")
    g.add_argument("--label-smoothing", type=non_negative_float, help="label smoothing of the training loss")
    g.add_argument("--ema-decay", type=non_negative_float, default=0.0, metavar="DECAY",
                   help="evaluate (and checkpoint) an exponential moving average of the weights, updated every "
                        "step with this decay: 0.99 averages over about 100 steps (default: 0, off)")
    g.add_argument("--flip", choices=["random", "alternating"], default="random",
                   help="random: each image mirrored with probability 1/2 every epoch; alternating: mirrored "
                        "in every other epoch, starting from a random half (airbench)")
    g.add_argument("--runs", type=positive_int, default=1,
                   help="train N times with seeds seed..seed+N-1 and report mean, std, min and max accuracy")
    if recipe.presets:
        p.presets = recipe.presets
        g.add_argument("--preset", choices=sorted(recipe.presets), default=None,
                       help="start from a named set of flag values; flags given explicitly override it. " +
                            "; ".join(f"{name}: {format_preset(values)}" for name, values in sorted(recipe.presets.items())))
    for title, flags in (("augmentation", recipe.augment_flags), ("model", recipe.model_flags)):
        if flags:
            g = p.add_argument_group(title)
            for flag, kwargs in flags:
                g.add_argument(flag, **kwargs)
    add_device_args(p)
    g = p.add_argument_group("outputs and checkpoints")
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder (default: runs/{recipe.name}-<timestamp>, or the checkpoint's folder on --resume)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from a last.pt or best.pt")
    g.add_argument("--eval-only", action="store_true",
                   help="with --resume: evaluate the checkpoint on --data's test split and write eval.json")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="evaluate on each test image and its mirror image, averaging the logits")
    g.add_argument("--tta-shift", type=int, choices=range(9), default=0, metavar="PIXELS",
                   help="also average copies of those views shifted PIXELS (0-8) diagonally each way; "
                        "triples the evaluation cost (default: 0, off)")
    g.add_argument("--eval-every", type=positive_int, default=1, metavar="N",
                   help="evaluate on the test set after every Nth epoch and after the last; the epochs between "
                        "have no test figures (default: 1, every epoch)")
    g.add_argument("--recalibrate-bn", type=non_negative_int, default=0, metavar="IMAGES",
                   help="before each evaluation, re-estimate the BatchNorm statistics over the first IMAGES "
                        "training images (class-balanced), un-augmented: a forward pass over them (default: 0, off)")
    p.set_defaults(**recipe.defaults)
    return p


def run_cli(entry, argv, parser):
    """Parse ``argv`` and run ``entry(args)``, turning UserError into one line on stderr."""
    args = parser.parse_args(argv)
    try:
        return entry(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the epoch loop, which handles its own
        print("\ninterrupted", file=sys.stderr)
        return 130


def train_main(recipe_name, argv=None):
    """The whole of a train_*.py script: its recipe's flags, then a run."""
    from .recipes import RECIPES
    from .trainer import run_training

    recipe = RECIPES[recipe_name]
    command = shlex.join(["python", recipe.script, *(sys.argv[1:] if argv is None else argv)])
    return run_cli(lambda args: run_training(recipe, args, command), argv, build_train_parser(recipe))

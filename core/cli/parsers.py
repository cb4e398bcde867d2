"""The scripts' command lines: their parsers, and the wrapper that turns a UserError into a
one-line message and a non-zero exit instead of a traceback. What each script does with its
parsed flags is ``core.cli.commands``; docs/flags.md is generated from these parsers by
``core.cli.flags_doc``."""

import argparse
import dataclasses
import sys

from ..errors import UserError
from ..flags import (
    at_least_two,
    below_one,
    learning_rate,
    lr_or_find,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_value,
    whole_number,
)
from ..train.compiled import COMPILE_MODES
from ..train.lr_finder import METHODS
from ..train.optim import DECAY_EXEMPT, OPTIMIZERS
from ..train.recipes import RECIPES


class _OnlyTyped(argparse.Namespace):
    """A namespace that argparse takes to hold every flag already (it fills in a default only
    where ``hasattr`` fails), so that after parsing it holds just the flags that were typed."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping (no flag's dest starts so)
            raise AttributeError(name)
        return None


class FlagGroup:
    """An argparse group that records each flag it defines in its parser's ``flags``."""

    def __init__(self, parser, group):
        self.parser, self.group = parser, group

    def add_argument(self, *names, resumable=False, **kwargs):
        return self.parser.record(self.group.add_argument(*names, **kwargs), self.group.title, resumable)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with single-line errors, like the rest of the toolkit's messages, that keeps its
    own record of the flags it defines (``flags``: each one's argparse action, ``--help`` group,
    and whether ``--resume`` may change it), which docs/flags.md and resume are built from.

    Parsing reads the command line once: the flags typed, laid over a ``--preset``'s values,
    laid over the defaults, so that explicit flags win over the preset."""

    def __init__(self, *args, presets=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        self.flags = []
        self.presets = presets or {}
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def record(self, action, group, resumable):
        if action.default is not argparse.SUPPRESS:  # not --help
            self.flags.append(Flag(action, group, resumable))
        return action

    def add_argument(self, *names, resumable=False, **kwargs):
        return self.record(super().add_argument(*names, **kwargs), "options", resumable)

    def add_flag_group(self, title):
        return FlagGroup(self, self.add_argument_group(title))

    def parse_typed(self, args=None):
        """The flags typed in ``args``, as {dest: value}; argparse's own checks and errors apply."""
        return vars(super().parse_args(args, _OnlyTyped()))

    def resumable(self):
        """The dests of the flags that say where and how to run, which --resume takes from the
        command line."""
        return frozenset(flag.dest for flag in self.flags if flag.resumable)

    def defaults(self):
        return {flag.dest: flag.action.default for flag in self.flags}

    def parse_with_given(self, args=None):
        """(the parsed flags, the dests of those typed), from one reading of ``args``."""
        typed = self.parse_typed(args)
        values = self.defaults()
        if typed.get("preset"):
            values.update(self.presets[typed["preset"]])
        values.update(typed)
        return argparse.Namespace(**values), frozenset(typed)

    def parse_args(self, args=None):
        return self.parse_with_given(args)[0]


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag as its parser defined it: argparse's action (its names, dest, default, help), the
    ``--help`` group it is listed in, and whether ``--resume`` takes it from the command line."""

    action: argparse.Action
    group: str
    resumable: bool

    @property
    def dest(self):
        return self.action.dest


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already explains it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        # ``is``, not ``in (None, False)``: a default of 0 equals False and would be hidden.
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def add_cache_arg(p):
    p.add_argument("--cache-dir", default=None, metavar="DIR", resumable=True,
                   help="where decoded uint8 arrays are cached (default: ~/.cache/cifar-toolkit; 'none' disables)")


def add_progress_arg(p):
    p.add_argument("--no-progress", action="store_true", resumable=True, help="plain log lines instead of tqdm bars")


def add_data_args(p):
    g = p.add_flag_group("data")
    g.add_argument("--data", default=None, metavar="PATH", resumable=True,
                   help="CIFAR-10 source: a folder holding cifar-10-batches-py/, an image folder with "
                        "train/<class>/ and test/<class>/, or a .tar/.tar.gz/.tgz of either "
                        "(default: ./data, downloading the official dataset there if missing)")
    add_cache_arg(g)
    g.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="train on a fixed class-balanced selection of the first N images")
    g.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                   help="evaluate on a fixed class-balanced selection of the first N test images")
    g.add_argument("--val-split", type=non_negative_int, default=0, metavar="N",
                   help="hold N class-balanced training images (after --train-subset) out as a validation set that "
                        "is never trained on, the same for every seed; best.pt is then chosen by validation accuracy "
                        "(default: 0, none)")


def add_device_args(p):
    g = p.add_flag_group("device and speed")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], resumable=True,
                   help="where to train; auto takes CUDA, then MPS, then the CPU")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 on recent GPUs and AMX/AVX512-BF16 CPUs, "
                        "fp16 with loss scaling on older GPUs (T4), else fp32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout, faster for convs with AMP")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE", resumable=True,
                   choices=list(COMPILE_MODES),
                   help="torch.compile the model: once for training and once for evaluation. MODE: " +
                        "; ".join(f"{k}: {v}" for k, v in COMPILE_MODES.items()) + " (bare --compile: default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN and torch kernels, no cuDNN autotuning: a CUDA run (and its resume) "
                        "repeats bit for bit, a little slower. CPU runs repeat without it")
    g.add_argument("--seed", type=seed_value, default=0, help="seed for init, data order and augmentation")
    add_progress_arg(g)


def add_param_group_args(g, script_defaults=False):
    """How the optimizer splits the parameters: the train scripts and the range test share these,
    so that a sweep reads the LR for the groups the run will train. With ``script_defaults`` (the
    range test) a flag left out is None, and the train script's default fills it in."""
    defaults = (None, None) if script_defaults else (1.0, "none")
    note = " (default: the train script's)" if script_defaults else ""
    g.add_argument("--bias-lr-scale", type=positive_float, default=defaults[0], metavar="K",
                   help="train biases (BN shifts, the FC bias) at K times the LR with weight decay / K "
                        "(Page's bag of tricks: 64)" + note)
    g.add_argument("--decay-exempt", choices=DECAY_EXEMPT, default=defaults[1],
                   help="train these with no weight decay: bias-norm: every bias and normalization weight; "
                        "bias-norm-depthwise: also the depthwise filters (nine weights each)" + note)


def add_sweep_length_arg(g):
    """--num-iter, in the range test and, for --lr-max find, in the train scripts."""
    g.add_argument("--num-iter", type=at_least_two, default=100,
                   help="training steps in the LR range test's sweep, each at --batch-size (fewer if the loss "
                        "diverges first); a train script takes it with --lr-max find")


def format_preset(values):
    """A preset as the command-line flags it stands for."""
    flags = []
    for dest, value in values.items():
        flag = "--" + dest.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def build_train_parser(recipe):
    p = ArgumentParser(prog=recipe.script, description=recipe.description, presets=recipe.presets)
    add_data_args(p)
    g = p.add_flag_group("training")
    g.add_argument("--epochs", type=positive_int, help="number of epochs")
    g.add_argument("--batch-size", type=positive_int, help="training batch size")
    g.add_argument("--eval-batch-size", type=positive_int, default=1024, help="evaluation batch size")
    g.add_argument("--lr-max", type=lr_or_find,
                   help="one-cycle peak LR, or 'find' to run the LR range test first and use its suggestion (the "
                        "sweep trains --num-iter steps at --batch-size, then training starts from the same weights)")
    g.add_argument("--lr-min", type=learning_rate, help="one-cycle start and end LR (no annihilation)")
    g.add_argument("--lr-from", default=None, metavar="JSON",
                   help="take --lr-max and --lr-min from a saved lr_finder.json that swept this model with this "
                        "--optimizer (refused beside --lr-max or --lr-min; it replaces a preset's bounds)")
    add_sweep_length_arg(g)
    g.add_argument("--max-at-epoch", type=positive_float, default=None,
                   help="epoch at which the LR peaks (default: 5, or 5/24 of --epochs when that is fewer)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), help="; ".join(f"{k}: {v}" for k, v in OPTIMIZERS.items()))
    g.add_argument("--cycle-momentum", action=argparse.BooleanOptionalAction,
                   help="run the momentum (Adam: beta1) 0.95 -> 0.85 -> 0.95 against the LR; "
                        "--no-cycle-momentum keeps it at 0.9")
    g.add_argument("--weight-decay", type=non_negative_float,
                   help="weight decay (SGD, AdamW) or L2 (Adam); default, by --optimizer: "
                        + ", ".join(f"{name} {value:g}" for name, value in recipe.weight_decay.items()))
    add_param_group_args(g)
    g.add_argument("--label-smoothing", type=below_one, help="label smoothing of the training loss, in [0, 1)")
    g.add_argument("--ema-decay", type=non_negative_float, default=0.0, metavar="DECAY",
                   help="evaluate (and checkpoint) an exponential moving average of the weights, updated every "
                        "step with this decay: 0.99 averages over about 100 steps (default: 0, off)")
    g.add_argument("--flip", choices=["random", "alternating"], default="random",
                   help="random: each image mirrored with probability 1/2 every epoch; alternating: mirrored "
                        "in every other epoch, starting from a random half (airbench)")
    g.add_argument("--runs", type=positive_int, default=1,
                   help="train N times with seeds seed..seed+N-1 and report mean, std, min and max accuracy")
    if recipe.presets:
        g.add_argument("--preset", choices=sorted(recipe.presets), default=None,
                       help="start from a named set of flag values; flags given explicitly override it. " +
                            "; ".join(f"{name}: {format_preset(values)}" for name, values in sorted(recipe.presets.items())))
    for title, flags in recipe.flag_groups():
        if flags:
            g = p.add_flag_group(title)
            for flag, kwargs in flags:
                g.add_argument(flag, **kwargs)
    add_device_args(p)
    g = p.add_flag_group("outputs and checkpoints")
    g.add_argument("--out", default=None, metavar="DIR", resumable=True,
                   help=f"output folder (default: runs/{recipe.name}-<timestamp>, or the checkpoint's folder on --resume)")
    g.add_argument("--overwrite", action="store_true", resumable=True,
                   help="replace the run that --out already holds (its checkpoints, metrics and range test); with "
                        "--eval-only, write into an --out that is not empty")
    g.add_argument("--save-every", type=positive_int, default=1, metavar="N", resumable=True,
                   help="write last.pt after every Nth epoch and the last (best.pt whenever the run improves); "
                        "an interrupted run resumes from the last one written")
    g.add_argument("--resume", default=None, metavar="PATH", resumable=True,
                   help="continue from a last.pt or best.pt, in its folder unless --out is given")
    g.add_argument("--eval-only", action="store_true", resumable=True,
                   help="with --resume: evaluate the checkpoint on --data's test split and write eval.json and its "
                        "figures to --out (default: a new eval-<timestamp> folder beside the checkpoint)")
    g.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="with --eval-only: score the test split, or the images the run held out with --val-split")
    g.add_argument("--live-weights", action="store_true",
                   help="with --eval-only: score the live weights of a run trained with --ema-decay, not the "
                        "average it evaluated")
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
    """Parse ``argv`` and run ``entry(args, given)`` (``given``: the dests of the flags typed),
    turning UserError into one line on stderr."""
    args, given = parser.parse_with_given(argv)
    try:
        return entry(args, given) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the epoch loop, which handles its own
        print("\ninterrupted", file=sys.stderr)
        return 130


def build_range_test_parser():
    p = ArgumentParser(prog="lr_range_test.py",
                       description="Leslie Smith's LR range test on any of the toolkit's models: which one-cycle "
                                   "bounds to use.")
    p.add_argument("--model", choices=sorted(RECIPES), default="resnet", help="which train script's model")
    add_data_args(p)
    g = p.add_flag_group("range test")
    g.add_argument("--batch-size", type=positive_int, default=None, help="default: the train script's")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None, help="default: the train script's")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="default: the train script's")
    add_param_group_args(g, script_defaults=True)
    g.add_argument("--start-lr", type=learning_rate, default=1e-5, help="the LR of the sweep's first step")
    g.add_argument("--end-lr", type=learning_rate, default=10.0, help="the LR of its last step")
    add_sweep_length_arg(g)
    g.add_argument("--mode", choices=["exp", "linear"], default="exp", help="LR spacing")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="how lr_max is read off the curve (default: min_div_2 for SGD, conservative for Adam; "
                        "see docs/lr_finder.md)")
    g.add_argument("--val", action="store_true",
                   help="record the test split's loss after each step instead; with --val-split the held-out "
                        "split's loss is recorded, --val or not")
    add_device_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/lr-find-<model>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds a run or another range test, replacing its lr_finder.json "
                        "and .png (with --plot-schedules: into a folder that is not empty)")
    p.add_argument("--plot-schedules", action="store_true",
                   help="only draw the triangular cyclic LR and the ResNet recipe's one-cycle LR and momentum")
    return p


def script_parsers():
    """Every entry point's parser, by script name."""
    parsers = {recipe.script: build_train_parser(recipe) for recipe in RECIPES.values()}
    parsers["lr_range_test.py"] = build_range_test_parser()
    parsers["predict.py"] = build_predict_parser()
    return parsers


def top_k_count(text):
    value = whole_number(text)
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{value} must lie in 1..10")
    return value


def build_predict_parser():
    p = ArgumentParser(prog="predict.py", description="Classify image files with a trained checkpoint.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched recursively for them; any size and mode: converted to "
                        "RGB and, unless 32x32, resized to 32x32 with antialiasing (bicubic)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a last.pt or best.pt a training run wrote")
    p.add_argument("--topk", type=top_k_count, default=3, metavar="K", help="how many classes to list per image (1-10)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, topk: [{class, prob}]} instead")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    p.add_argument("--gradcam", default=None, metavar="DIR",
                   help="also write each image with the Grad-CAM of its top class to DIR")
    p.add_argument("--overwrite", action="store_true", help="replace Grad-CAM images already in --gradcam DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to run; auto takes CUDA, then MPS, then the CPU")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    return p


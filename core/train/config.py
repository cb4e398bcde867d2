"""What a command is configured by: every flag of every script, defined once, as a field of a
frozen dataclass for its concern, with its type, default, help text and whether ``--resume``
may change it. ``core.cli.parsers`` builds the command lines from these fields, parsing gives a
``RunConfig`` (or a ``RangeTestConfig``, a ``PredictConfig``), and each part of the toolkit
receives the part it reads: the data loader the ``DataConfig``, the device the ``RuntimeConfig``.

A training field whose default is None where a recipe has a value of its own (``--epochs``,
``--lr-max`` ...) takes the recipe's (``Recipe.defaults``); the model's and the augmentation's
own flags are the recipe's (``Recipe.model_flags``, ``Recipe.augment_flags``). The config is
never rewritten: what a run derives from it (the LR peak's epoch, the LR bounds, the output
folder) is a value of its own, so a checkpoint's flags stay the flags the user typed.
"""

import argparse
import dataclasses
from types import MappingProxyType
from typing import ClassVar

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
)
from .compiled import COMPILE_MODES
from .optim import DECAY_EXEMPT, OPTIMIZERS, SGD_MOMENTUM


def flag(default=None, help="", *, resumable=False, positional=False, **argparse_kwargs):
    """A config field that is also a command-line flag ``--<name-with-dashes>`` (``positional``:
    an argument without dashes). ``argparse_kwargs`` (type, choices, action, metavar ...) go to
    argparse as they are; ``resumable`` marks a flag that says where and how to run, which
    ``--resume`` takes from the command line (every other one comes from the checkpoint)."""
    metadata = {"help": help, "resumable": resumable, "positional": positional, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


def bias_lr_scale_flag(default, note=""):
    return flag(default, type=positive_float, metavar="K",
                help="train biases (BN shifts, the FC bias) at K times the LR with weight decay / K "
                     "(Page's bag of tricks: 64)" + note)


def decay_exempt_flag(default, note=""):
    return flag(default, choices=DECAY_EXEMPT,
                help="train these with no weight decay: bias-norm: every bias and normalization weight; "
                     "bias-norm-depthwise: also the depthwise filters (nine weights each)" + note)


def num_iter_flag():
    return flag(100, type=at_least_two,
                help="training steps in the LR range test's sweep, each at --batch-size (fewer if the loss "
                     "diverges first); a train script takes it with --lr-max find")


def cache_dir_flag():
    return flag(None, metavar="DIR", resumable=True,
                help="where decoded uint8 arrays are cached (default: ~/.cache/cifar-toolkit; 'none' disables)")


def no_progress_flag():
    return flag(False, action="store_true", resumable=True, help="plain log lines instead of tqdm bars")


def device_flag(doing, resumable=True):
    return flag("auto", choices=["auto", "cuda", "mps", "cpu"], resumable=resumable,
                help=f"where to {doing}; auto takes CUDA, then MPS, then the CPU")


SCRIPT_DEFAULT = " (default: the train script's)"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which images: where they come from, where their decoded arrays are cached, and which of
    them train, validate and test."""

    TITLE: ClassVar[str] = "data"
    data: str | None = flag(None, metavar="PATH", resumable=True,
                            help="CIFAR-10 source: a folder holding cifar-10-batches-py/, an image folder with "
                                 "train/<class>/ and test/<class>/, or a .tar/.tar.gz/.tgz of either "
                                 "(default: ./data, downloading the official dataset there if missing)")
    cache_dir: str | None = cache_dir_flag()
    train_subset: int | None = flag(None, type=positive_int, metavar="N",
                                    help="train on a fixed class-balanced selection of the first N images")
    test_subset: int | None = flag(None, type=positive_int, metavar="N",
                                   help="evaluate on a fixed class-balanced selection of the first N test images")
    val_split: int = flag(0, type=non_negative_int, metavar="N",
                          help="hold N class-balanced training images (after --train-subset) out as a validation "
                               "set that is never trained on, the same for every seed; best.pt is then chosen by "
                               "validation accuracy (default: 0, none)")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How the weights are trained: length, batch, LR schedule, optimizer, loss, averaging."""

    TITLE: ClassVar[str] = "training"
    epochs: int = flag(None, type=positive_int, help="number of epochs")
    batch_size: int = flag(None, type=positive_int, help="training batch size")
    lr_max: float | str = flag(None, type=lr_or_find,
                               help="one-cycle peak LR, or 'find' to run the LR range test first and use its "
                                    "suggestion (the sweep trains --num-iter steps at --batch-size, then training "
                                    "starts from the same weights)")
    lr_min: float = flag(None, type=learning_rate, help="one-cycle start and end LR (no annihilation)")
    lr_end: float | None = flag(None, type=learning_rate, help="end the one-cycle at this LR, not at --lr-min")
    lr_from: str | None = flag(None, metavar="JSON",
                               help="take --lr-max and --lr-min from a saved lr_finder.json that swept this model "
                                    "with this --optimizer (refused beside --lr-max or --lr-min; it replaces a "
                                    "preset's bounds)")
    num_iter: int = num_iter_flag()
    max_at_epoch: float | None = flag(None, type=positive_float,
                                      help="epoch at which the LR peaks (default: 5, or 5/24 of --epochs when that "
                                           "is fewer)")
    optimizer: str = flag(None, choices=list(OPTIMIZERS),
                          help="; ".join(f"{k}: {v}" for k, v in OPTIMIZERS.items()))
    cycle_momentum: bool = flag(None, action=argparse.BooleanOptionalAction,
                                help="run the momentum (Adam: beta1) 0.95 -> 0.85 -> 0.95 against the LR; "
                                     "--no-cycle-momentum keeps it at --momentum")
    momentum: float = flag(SGD_MOMENTUM, type=below_one, help="SGD's Nesterov momentum, when not cycled")
    muon_lr_scale: float = flag(0.16, type=positive_float, metavar="K",
                                help="with --optimizer muon: the conv filters' LR as a multiple of the schedule's "
                                     "(airbench: 0.24 against its SGD peak of 1.5)")
    weight_decay: float | None = flag(None, type=non_negative_float,
                                      help="weight decay (SGD, AdamW) or L2 (Adam); default, by --optimizer: "
                                           "{weight_decays}")
    bias_lr_scale: float = bias_lr_scale_flag(1.0)
    whiten_bias_epochs: int = flag(0, type=non_negative_int, metavar="N",
                                   help="train a frozen whitening layer's bias for N epochs only (0: throughout)")
    decay_exempt: str = decay_exempt_flag("none")
    label_smoothing: float = flag(None, type=below_one, help="label smoothing of the training loss, in [0, 1)")
    ema_decay: float = flag(0.0, type=non_negative_float, metavar="DECAY",
                            help="evaluate (and checkpoint) an exponential moving average of the weights, updated "
                                 "every step with this decay: 0.99 averages over about 100 steps (default: 0, off)")
    lookahead: bool = flag(False, action=argparse.BooleanOptionalAction,
                           help="every 5 steps, move a slow copy of the weights towards the live ones and restart "
                                "from it, more slowly as the run ends; end on it (airbench's Lookahead)")
    flip: str = flag("random", choices=["random", "alternating"],
                     help="random: each image mirrored with probability 1/2 every epoch; alternating: mirrored "
                          "in every other epoch, starting from a random half (airbench)")
    sync_bn: bool = flag(False, action="store_true",
                         help="under torchrun on CUDA: BatchNorm over the whole batch across the processes "
                              "(SyncBatchNorm) instead of over each process's share")
    runs: int = flag(1, type=positive_int,
                     help="train N times with seeds seed..seed+N-1 and report mean, std, min and max accuracy")
    preset: str | None = flag(None, help="start from a named set of flag values; flags given explicitly override "
                                         "it. {presets}")

    @property
    def peak_epoch(self):
        """The epoch at which the one-cycle LR peaks: --max-at-epoch, else the assignments' 5 of 24
        epochs (5/24 of --epochs for shorter runs, so a short run still warms up for a fifth)."""
        return self.max_at_epoch if self.max_at_epoch is not None else min(5.0, self.epochs * 5 / 24)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """How the weights are scored: batch, test-time augmentation, how often, BN statistics, and
    what --eval-only scores."""

    TITLE: ClassVar[str] = "evaluation"
    eval_batch_size: int = flag(1024, type=positive_int, help="evaluation batch size")
    tta: bool = flag(None, action=argparse.BooleanOptionalAction,
                     help="evaluate on each test image and its mirror image, averaging the logits")
    tta_shift: int = flag(0, type=int, choices=range(9), metavar="PIXELS",
                          help="also average copies of those views shifted PIXELS (0-8) diagonally each way; "
                               "triples the evaluation cost (default: 0, off)")
    eval_every: int = flag(1, type=non_negative_int, metavar="N",
                           help="evaluate on the test set after every Nth epoch and after the last; the epochs "
                                "between have no test figures (0: after the last alone)")
    recalibrate_bn: int = flag(0, type=non_negative_int, metavar="IMAGES",
                               help="before each evaluation, re-estimate the BatchNorm statistics over the first "
                                    "IMAGES training images (class-balanced), un-augmented: a forward pass over them "
                                    "(default: 0, off)")
    eval_split: str = flag("test", choices=("test", "val"),
                           help="with --eval-only: score the test split, or the images the run held out with "
                                "--val-split")
    live_weights: bool = flag(False, action="store_true",
                              help="with --eval-only: score the live weights of a run trained with --ema-decay, "
                                   "not the average it evaluated")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast a command runs, and what it draws: none of it changes what is trained,
    except the seed."""

    TITLE: ClassVar[str] = "device and speed"
    device: str = device_flag("train")
    amp: str = flag("auto", choices=["auto", "bf16", "fp16", "off"],
                    help="mixed precision; auto: bf16 on recent GPUs and AMX/AVX512-BF16 CPUs, "
                         "fp16 with loss scaling on older GPUs (T4), else fp32")
    channels_last: bool = flag(True, action=argparse.BooleanOptionalAction,
                               help="NHWC memory layout, faster for convs with AMP")
    compile: str | None = flag(None, nargs="?", const="default", metavar="MODE", resumable=True,
                               choices=list(COMPILE_MODES),
                               help="torch.compile the model: once for training and once for evaluation. MODE: "
                                    + "; ".join(f"{k}: {v}" for k, v in COMPILE_MODES.items())
                                    + " (bare --compile: default)")
    deterministic: bool = flag(False, action="store_true",
                               help="deterministic cuDNN and torch kernels, no cuDNN autotuning: a CUDA run (and its "
                                    "resume) repeats bit for bit, a little slower. CPU runs repeat without it")
    seed: int = flag(0, type=seed_value, help="seed for init, data order and augmentation")
    no_progress: bool = no_progress_flag()

    @property
    def progress(self):
        """Whether long work draws tqdm bars (else plain log lines)."""
        return not self.no_progress


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where a run writes, what it may replace, and which checkpoint it continues or scores."""

    TITLE: ClassVar[str] = "outputs and checkpoints"
    out: str | None = flag(None, metavar="DIR", resumable=True,
                           help="output folder (default: runs/{name}-<timestamp>, or the checkpoint's folder on "
                                "--resume)")
    overwrite: bool = flag(False, action="store_true", resumable=True,
                           help="replace the run that --out already holds (its checkpoints, metrics and range test); "
                                "with --eval-only, write into an --out that is not empty")
    save_every: int = flag(1, type=positive_int, metavar="N", resumable=True,
                           help="write last.pt after every Nth epoch and the last (best.pt whenever the run "
                                "improves); an interrupted run resumes from the last one written")
    resume: str | None = flag(None, metavar="PATH", resumable=True,
                              help="continue from a last.pt or best.pt, in its folder unless --out is given")
    eval_only: bool = flag(False, action="store_true", resumable=True,
                           help="with --resume: evaluate the checkpoint on --data's test split and write eval.json "
                                "and its figures to --out (default: a new eval-<timestamp> folder beside the "
                                "checkpoint)")


# The parts of a RunConfig by its field names. --help lists their groups in this order, with the
# recipe's own augmentation and model flags between training and evaluation.
RUN_PARTS = {"data": DataConfig, "training": TrainingConfig, "evaluation": EvaluationConfig,
             "runtime": RuntimeConfig, "outputs": OutputConfig}


def dests(part):
    return [f.name for f in dataclasses.fields(part)]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A train script's whole configuration, by concern. ``augment`` and ``model`` hold the
    recipe's own flags: the keywords of its augmentation pipeline and of its model's constructor."""

    data: DataConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    runtime: RuntimeConfig
    outputs: OutputConfig
    augment: MappingProxyType = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    model: MappingProxyType = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_flags(cls, values, augment_dests=(), model_dests=()):
        """The config of ``values`` ({dest: value}: the flags as parsed, or as a checkpoint keeps
        them; a flag left out takes its field's default); ``augment_dests`` and ``model_dests`` name
        the recipe's own flags among them."""
        unknown = set(values) - set().union(*map(dests, RUN_PARTS.values()), augment_dests, model_dests)
        if unknown:
            raise UserError(f"{', '.join(sorted(unknown))}: not flags of this recipe in this version")
        parts = {name: part(**{d: values[d] for d in dests(part) if d in values}) for name, part in RUN_PARTS.items()}
        own = {"augment": augment_dests, "model": model_dests}
        parts.update({name: MappingProxyType({d: values[d] for d in names if d in values})
                      for name, names in own.items()})
        return cls(**parts)

    def flags(self):
        """Every flag as {dest: value}: plain values, fit for a weights_only checkpoint and
        metrics.json, and what ``from_flags`` reads back."""
        values = {}
        for name in RUN_PARTS:
            values.update(dataclasses.asdict(getattr(self, name)))
        return {**values, **self.augment, **self.model}

    def replace(self, **values):
        """This config with the flags ``values`` ({dest: value}) changed."""
        return RunConfig.from_flags({**self.flags(), **values}, tuple(self.augment), tuple(self.model))

    def check(self):
        """The checks argparse cannot make one flag at a time."""
        t, outputs, evaluation = self.training, self.outputs, self.evaluation
        if not 0 < t.peak_epoch < t.epochs:
            raise UserError(f"--max-at-epoch {t.peak_epoch} must lie strictly between 0 and --epochs {t.epochs}")
        if t.lr_max != "find" and t.lr_min >= t.lr_max:
            raise UserError(f"--lr-min {t.lr_min} must be below --lr-max {t.lr_max}")
        if t.lr_max != "find" and t.lr_end is not None and t.lr_end >= t.lr_max:
            raise UserError(f"--lr-end {t.lr_end} must be below --lr-max {t.lr_max}")
        if outputs.eval_only and not outputs.resume:
            raise UserError("--eval-only needs --resume PATH to the checkpoint to evaluate")
        for flag_name, given in (("--eval-split val", evaluation.eval_split != "test"),
                                 ("--live-weights", evaluation.live_weights)):
            if given and not outputs.eval_only:
                raise UserError(f"{flag_name} chooses what --eval-only scores: add --eval-only (and --resume PATH)")
        if not 0 <= t.ema_decay < 1:
            raise UserError(f"--ema-decay {t.ema_decay} must lie in [0, 1): 0 turns the average off, 0.99 averages "
                            f"over about 100 steps")
        if t.optimizer == "muon" and t.cycle_momentum:
            raise UserError("--optimizer muon keeps its momenta fixed: add --no-cycle-momentum")
        if t.runs > 1 and outputs.resume:
            raise UserError("--runs repeats whole runs; resume each run's last.pt on its own instead")


def refuse_contradictions(training, given):
    """Training flags typed together (``given``: their dests) that one of them would silently
    override."""
    if training.lr_from and given & {"lr_max", "lr_min"}:
        typed = " and ".join(f"--{d.replace('_', '-')}" for d in sorted(given & {"lr_max", "lr_min"}))
        raise UserError(f"--lr-from {training.lr_from} gives --lr-max and --lr-min: drop {typed}, or drop --lr-from")
    if training.lr_max == "find" and "lr_min" in given:
        raise UserError("--lr-max find reads --lr-min off the sweep too: drop --lr-min, or give --lr-max as a number")
    if "momentum" in given and (training.optimizer not in ("sgd", "muon") or training.cycle_momentum):
        raise UserError("--momentum is SGD's fixed momentum: drop it, or add --optimizer sgd --no-cycle-momentum")
    if "muon_lr_scale" in given and training.optimizer != "muon":
        raise UserError("--muon-lr-scale sets the LR of --optimizer muon's filters: add --optimizer muon, or drop it")
    if "num_iter" in given and training.lr_max != "find":
        raise UserError("--num-iter sets the length of --lr-max find's sweep: add --lr-max find, or drop --num-iter")

"""The scripts' command lines, built from the fields of their config (``core.train.config``),
and the wrapper that turns a UserError into a one-line message and a non-zero exit instead of a
traceback. What each script does with its parsed config is ``core.cli.commands``; docs/flags.md
is generated from these parsers by ``core.cli.flags_doc``."""

import argparse
import dataclasses
import sys

from ..errors import UserError
from ..train.config import DataConfig, EvaluationConfig, OutputConfig, RuntimeConfig, TrainingConfig
from ..train.recipes import RECIPES
from .tool_config import PredictConfig, RangeTestOptions, SweepConfig

# What --help adds to a flag's help that does not explain its default itself; docs/flags.md
# shows the default in a column of its own instead.
DEFAULT_NOTE = " (default: %(default)s)"


class _OnlyTyped(argparse.Namespace):
    """A namespace that argparse takes to hold every flag already (it fills in a default only
    where ``hasattr`` fails), so that after parsing it holds just the flags that were typed."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping (no flag's dest starts so)
            raise AttributeError(name)
        return None


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with single-line errors, like the rest of the toolkit's messages, that keeps its
    own record of the flags it defines (``flags``), which docs/flags.md and resume are built from.

    Parsing reads the command line once: the flags typed, laid over a ``--preset``'s values,
    laid over the defaults, so that explicit flags win over the preset."""

    def __init__(self, *args, presets=None, **kwargs):
        self.flags = []
        self.presets = presets or {}
        self.groups = {}
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_flag(self, group, names, *, default, help, resumable=False, **kwargs):
        """A flag in the ``--help`` group titled ``group`` ('options': argparse's own), whose help
        shows its default unless it explains it or there is none (None, or a switch that is off)."""
        if group == "options":
            container = self
        else:
            if group not in self.groups:
                self.groups[group] = self.add_argument_group(group)
            container = self.groups[group]
        action = container.add_argument(*names, default=default, help=help, **kwargs)
        if "default" not in help and default is not None and default is not False:
            action.help = help + DEFAULT_NOTE
        self.flags.append(Flag(action, group, resumable))
        return action

    def add_part(self, part, defaults=None, context=None, choices=None, only=None):
        """A flag for each field of the config dataclass ``part`` (or those named in ``only``), in
        its group: ``defaults`` ({dest: value}) replace the fields' own, ``context`` fills the
        {placeholders} of their help texts, and ``choices`` ({dest: choices}) gives those known
        only here."""
        for field in dataclasses.fields(part):
            if only is not None and field.name not in only:
                continue
            if choices is not None and field.name in choices and not choices[field.name]:
                continue  # no choices at all (a recipe without presets): no flag
            meta = field.metadata
            names = [field.name] if meta["positional"] else ["--" + field.name.replace("_", "-")]
            kwargs = dict(meta["argparse"])
            if choices and field.name in choices:
                kwargs["choices"] = choices[field.name]
            self.add_flag(part.TITLE, names, default=(defaults or {}).get(field.name, field.default),
                          help=meta["help"].format_map(context or {}), resumable=meta["resumable"], **kwargs)

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
        """(the parsed flags as {dest: value}, the dests of those typed), from one reading of ``args``."""
        typed = self.parse_typed(args)
        values = self.defaults()
        if typed.get("preset"):
            values.update(self.presets[typed["preset"]])
        values.update(typed)
        return values, frozenset(typed)


def format_preset(values):
    """A preset as the command-line flags it stands for."""
    flags = []
    for dest, value in values.items():
        flag = "--" + dest.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def build_train_parser(recipe):
    p = ArgumentParser(prog=recipe.script, description=recipe.description, presets=recipe.presets)
    context = {"name": recipe.name,
               "weight_decays": ", ".join(f"{name} {value:g}" for name, value in recipe.weight_decay.items()),
               "presets": "; ".join(f"{name}: {format_preset(values)}"
                                    for name, values in sorted(recipe.presets.items()))}
    p.add_part(DataConfig, recipe.defaults)
    p.add_part(TrainingConfig, recipe.defaults, context, choices={"preset": sorted(recipe.presets)})
    for title, flags in recipe.flag_groups():
        for name, kwargs in flags:
            p.add_flag(title, [name], **kwargs)
    for part in (EvaluationConfig, RuntimeConfig, OutputConfig):
        p.add_part(part, recipe.defaults, context)
    return p


def parse_run_config(recipe, argv):
    """The ``RunConfig`` that ``recipe``'s train script parses from ``argv``: the Python way to
    configure a run as its command line would."""
    return recipe.config(build_train_parser(recipe).parse_with_given(argv)[0])


def run_cli(entry, argv, parser, quiet=False):
    """Parse ``argv`` and run ``entry(values, given)`` (``values``: {dest: value} of every flag;
    ``given``: the dests of the flags typed), turning UserError into one line on stderr, or
    into the exit status alone where ``quiet`` (a torchrun process whose rank 0 says it)."""
    values, given = parser.parse_with_given(argv)
    try:
        return entry(values, given) or 0
    except UserError as exc:
        if not quiet:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the epoch loop, which handles its own
        if not quiet:
            print("\ninterrupted", file=sys.stderr)
        return 130


def build_range_test_parser():
    p = ArgumentParser(prog="lr_range_test.py",
                       description="Leslie Smith's LR range test on any of the toolkit's models: which one-cycle "
                                   "bounds to use.")
    p.add_part(RangeTestOptions, choices={"model": sorted(RECIPES)})
    for part in (DataConfig, SweepConfig, RuntimeConfig):
        p.add_part(part)
    return p


def script_parsers():
    """Every entry point's parser, by script name."""
    parsers = {recipe.script: build_train_parser(recipe) for recipe in RECIPES.values()}
    parsers["lr_range_test.py"] = build_range_test_parser()
    parsers["predict.py"] = build_predict_parser()
    return parsers


def build_predict_parser():
    p = ArgumentParser(prog="predict.py", description="Classify image files with a trained checkpoint.")
    p.add_part(PredictConfig)
    return p

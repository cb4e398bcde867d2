"""What each entry point does with its parsed flags: the train scripts run a training, and
lr_range_test.py sweeps the LR for a recipe or draws the schedule examples."""

import argparse
import shlex
import sys
from datetime import datetime
from pathlib import Path

from . import plots
from .build import Setup
from .cli import build_range_test_parser, build_train_parser, given_flags, run_cli
from .errors import UserError
from .flags import plain_flags
from .lr_finder_runner import find_bounds
from .outputs import check_folder, make_folder
from .recipes import RECIPES
from .trainer import run_training


def train_main(recipe_name, argv=None):
    """The whole of a train_*.py script: its recipe's flags, then a run."""
    recipe = RECIPES[recipe_name]
    typed = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", recipe.script, *typed])
    parser = build_train_parser(recipe)
    return run_cli(lambda args: run_training(recipe, args, command, given_flags(parser, typed)), typed, parser)


def range_test_main(argv=None):
    """The whole of lr_range_test.py."""
    return run_cli(run_range_test, argv, build_range_test_parser())


def run_range_test(args):
    out = Path(args.out or f"runs/lr-find-{args.model}-{datetime.now():%Y%m%d-%H%M%S}")
    if args.plot_schedules:
        make_folder(out)
        for path in plots.plot_schedule_examples(out, "ResNet", RECIPES["resnet"].defaults):
            print(f"wrote {path}")
        return 0
    if args.start_lr >= args.end_lr:
        raise UserError(f"--start-lr {args.start_lr} must be below --end-lr {args.end_lr}")
    recipe = RECIPES[args.model]
    train_args = recipe_flags(recipe, args)
    check_folder(out)
    s = Setup(recipe, train_args)
    make_folder(out)
    print(s.summary)
    record = find_bounds(s.model, s.optimizer, s.loss_fn, s.train_loader, s.device, s.amp_dtype, out,
                         start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter, mode=args.mode,
                         optimizer_name=train_args.optimizer, method=args.method,
                         val_loader=s.test_loader if args.val else None, settings=plain_flags(args),
                         advice="widen --start-lr/--end-lr or raise --num-iter")
    steps = len(record["lrs"])
    stop = f", stopped at step {record['diverged_at']} as the loss diverged" if record["diverged_at"] is not None else ""
    print(f"\nRange test: {steps} steps from {record['lrs'][0]:.3g} to {record['lrs'][-1]:.3g}{stop}")
    for name, lr in record["suggestions"].items():
        print(f"  {name:>12}: {lr:.4g}")
    print(f"Suggested one-cycle bounds: lr_max {record['lr_max']:.4g} ({record['method']}), "
          f"lr_min {record['lr_min']:.4g} ({record['lr_min_method']})")
    # Every flag that changed the reading, so the run trains as the sweep did.
    command = ["python", recipe.script, "--lr-max", f"{record['lr_max']:.4g}", "--lr-min", f"{record['lr_min']:.4g}",
               "--optimizer", train_args.optimizer, "--batch-size", str(train_args.batch_size),
               "--weight-decay", f"{train_args.weight_decay:g}"]
    if args.data:
        command += ["--data", args.data]
    if args.train_subset:
        command += ["--train-subset", str(args.train_subset)]
    print("Train with:\n  " + shlex.join(command))
    print(f"(or: {shlex.join(['python', recipe.script, '--lr-from', str(out / 'lr_finder.json')])})")
    print(f"Wrote {out / 'lr_finder.json'} and {out / 'lr_finder.png'}")
    return 0


def recipe_flags(recipe, args):
    """The train script's flags for this model, with every range-test flag that the train script
    also has laid over them where it was given (None leaves the train script's default)."""
    train = vars(build_train_parser(recipe).parse_args([]))
    given = {key: value for key, value in vars(args).items() if key in train and value is not None}
    return argparse.Namespace(**{**train, **given})


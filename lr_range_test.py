"""Leslie Smith's LR range test on any of the toolkit's models: which one-cycle bounds to use.

    python lr_range_test.py --model resnet --data cifar10.tar.gz
    python lr_range_test.py --plot-schedules --out DIR    # draw the cyclic and one-cycle curves

Writes lr_finder.json and lr_finder.png to --out, prints the suggestions and the train command
that uses them. The model and data pipeline are the train script's own.
"""

import shlex
import sys
from datetime import datetime
from pathlib import Path

from core.cli import (ArgumentParser, add_data_args, add_device_args, non_negative_float, positive_float,
                      positive_int, run_cli)
from core.errors import UserError
from core.lr_finder import METHODS
from core.recipes import RECIPES


def parser():
    p = ArgumentParser(prog="lr_range_test.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(RECIPES), default="resnet", help="which train script's model")
    add_data_args(p)
    g = p.add_argument_group("range test")
    g.add_argument("--batch-size", type=positive_int, default=None, help="default: the train script's")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=None, help="default: the train script's")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="default: the train script's")
    g.add_argument("--start-lr", type=positive_float, default=1e-5)
    g.add_argument("--end-lr", type=positive_float, default=10.0)
    g.add_argument("--num-iter", type=positive_int, default=100)
    g.add_argument("--mode", choices=["exp", "linear"], default="exp", help="LR spacing")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="how lr_max is read off the curve (default: min_div_2 for SGD, conservative for Adam; "
                        "see core/lr_finder.py)")
    g.add_argument("--val", action="store_true", help="record the test split's loss after each step instead")
    add_device_args(p)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/lr-find-<model>-<timestamp>)")
    p.add_argument("--plot-schedules", action="store_true",
                   help="only draw the triangular cyclic LR and the ResNet recipe's one-cycle LR and momentum")
    return p


def range_test_main(args):
    from core.plots import plot_schedule_examples
    from core.range_test import find_bounds
    from core.trainer import Setup, plain_args

    out = Path(args.out or f"runs/lr-find-{args.model}-{datetime.now():%Y%m%d-%H%M%S}")
    if args.plot_schedules:
        out.mkdir(parents=True, exist_ok=True)
        for path in plot_schedule_examples(out):
            print(f"wrote {path}")
        return 0
    if args.start_lr >= args.end_lr:
        raise UserError(f"--start-lr {args.start_lr} must be below --end-lr {args.end_lr}")
    recipe = RECIPES[args.model]
    train_args = recipe_args(recipe, args)
    s = Setup(recipe, train_args)
    out.mkdir(parents=True, exist_ok=True)
    print(s.summary)
    record = find_bounds(s.model, s.optimizer, s.loss_fn, s.train_loader, s.device, s.amp_dtype, out,
                         start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter, mode=args.mode,
                         optimizer_name=train_args.optimizer, method=args.method,
                         val_loader=s.test_loader if args.val else None, settings=plain_args(args))
    steps = len(record["lrs"])
    stop = f", stopped at step {record['diverged_at']} as the loss diverged" if record["diverged_at"] is not None else ""
    print(f"\nRange test: {steps} steps from {record['lrs'][0]:.3g} to {record['lrs'][-1]:.3g}{stop}")
    for name, lr in record["suggestions"].items():
        print(f"  {name:>12}: {lr:.4g}")
    print(f"Suggested one-cycle bounds: lr_max {record['lr_max']:.4g} ({record['method']}), "
          f"lr_min {record['lr_min']:.4g} ({record['lr_min_method']})")
    command = ["python", recipe.script, "--lr-max", f"{record['lr_max']:.4g}", "--lr-min", f"{record['lr_min']:.4g}",
               "--optimizer", train_args.optimizer]
    if args.data:
        command += ["--data", args.data]
    print("Train with:\n  " + shlex.join(command))
    print(f"(or: {shlex.join(['python', recipe.script, '--lr-from', str(out / 'lr_finder.json')])})")
    print(f"Wrote {out / 'lr_finder.json'} and {out / 'lr_finder.png'}")
    return 0


def recipe_args(recipe, args):
    """The train script's flags for this model, with the range test's own choices laid over."""
    from core.cli import build_train_parser

    train_args = build_train_parser(recipe).parse_args([])
    for key in ("data", "cache_dir", "train_subset", "test_subset", "device", "amp", "channels_last", "seed"):
        setattr(train_args, key, getattr(args, key))
    for key in ("batch_size", "optimizer", "weight_decay"):
        if getattr(args, key) is not None:
            setattr(train_args, key, getattr(args, key))
    return train_args


def main(argv=None):
    return run_cli(range_test_main, argv, parser())


if __name__ == "__main__":
    sys.exit(main())

"""Which folder a run writes into, and whether it may: a run never overwrites another run's
work unless told to, never rewinds a run, and never writes into a folder another live run holds."""

import contextlib
import os
import shlex
from datetime import datetime
from pathlib import Path

from .checkpoint import load_checkpoint
from .errors import UserError
from .outputs import check_folder, claimed, make_folder, remove_stale_temp_files

# What a run leaves in its folder that a new run might not write again (best.pt if it never
# improves, lr_finder.* without --lr-max find, eval.json): --overwrite removes these first.
REPLACED_FILES = ("last.pt", "best.pt", "metrics.json", "metrics.csv", "lr_finder.json", "lr_finder.png", "eval.json")


def default_out(recipe):
    return Path(f"runs/{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}")


def run_folder(recipe, args):
    """--out; else, on a resume, the folder the checkpoint lies in (not the one it was trained in:
    a copy resumes as a copy); else a new folder under runs/."""
    if args.out:
        return Path(args.out)
    return Path(args.resume).parent if args.resume else default_out(recipe)


def resume_command(script, checkpoint):
    return shlex.join(["python", script, "--resume", str(checkpoint)])


def check_run_folder(out, args, ckpt, script):
    """Everything that can refuse ``out`` before any work is done (nothing is written)."""
    check_folder(out)
    last = out / "last.pt"
    if ckpt is None:
        held = [name for name in ("last.pt", "metrics.json") if (out / name).exists()]
        if held and not args.overwrite:
            raise UserError(f"{out} already holds a run ({', '.join(held)}): continue it with "
                            f"{resume_command(script, last)}, or pass --overwrite to replace it")
    elif last.exists() and not _same_file(last, args.resume):
        there = load_checkpoint(last, purpose="resume")["epoch"]
        if there > ckpt["epoch"]:
            raise UserError(f"{args.resume} holds epoch {ckpt['epoch']} but {last} is at epoch {there}: resuming "
                            f"would rewind {out}; resume {last}, or branch off with --out NEW_FOLDER")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def claimed_run_folder(out, args, ckpt):
    """Create ``out`` and hold it for the run; clear what dead processes and, with --overwrite,
    the replaced run left there."""
    make_folder(out)
    with claimed(out):
        remove_stale_temp_files(out)
        if ckpt is None and args.overwrite:
            replaced = [name for name in REPLACED_FILES if (out / name).exists()]
            if replaced:
                print(f"--overwrite: replacing the run in {out} ({', '.join(replaced)})")
            for name in replaced:
                (out / name).unlink()
        yield

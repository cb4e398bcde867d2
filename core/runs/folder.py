"""Which folder a command writes into, and whether it may: no command overwrites another run's
work unless told to, a resume never rewinds a run, and nothing writes into a folder another live
command holds."""

import contextlib
import os
import shlex
from datetime import datetime
from pathlib import Path

from ..errors import UserError
from .checkpoint import load_checkpoint
from .outputs import check_folder, claimed, make_folder, remove_stale_temp_files

# What a run leaves in its folder that a new run might not write again (best.pt if it never
# improves, lr_finder.* without --lr-max find, eval.json): --overwrite removes these first.
REPLACED_FILES = ("last.pt", "best.pt", "metrics.json", "metrics.csv", "lr_finder.json", "lr_finder.png", "eval.json")
RANGE_TEST_FILES = ("lr_finder.json", "lr_finder.png")


def run_folder(recipe, outputs):
    """--out; else, on a resume, the folder the checkpoint lies in (not the one it was trained in:
    a copy resumes as a copy); else a new folder under runs/."""
    if outputs.out:
        return Path(outputs.out)
    return Path(outputs.resume).parent if outputs.resume else default_out(recipe)


def new_folder(parent, prefix):
    """A folder under ``parent`` that does not exist yet, named ``prefix``-<timestamp>."""
    stamp = f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
    path, k = parent / stamp, 2
    while path.exists():
        path, k = parent / f"{stamp}-{k}", k + 1
    return path


def default_out(recipe):
    """A new runs/<model>-<timestamp> folder: two runs started in the same second get two."""
    return new_folder(Path("runs"), recipe.name)


def eval_folder(outputs):
    """--eval-only's folder: --out, else a new eval-<timestamp> folder beside the checkpoint, so
    that scoring a run never replaces the figures the run drew of itself."""
    return Path(outputs.out) if outputs.out else new_folder(Path(outputs.resume).parent, "eval")


def check_new_or_empty(out, overwrite, what):
    """Refuse, unless --overwrite, an --out that holds anything: ``what`` (an evaluation, the
    schedule drawings) writes into a folder of its own."""
    check_folder(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise UserError(f"--out {out} is not empty ({listed}): {what} writes into a new or empty folder; choose "
                        f"another --out, or pass --overwrite to write there anyway")


def check_range_test_folder(out, overwrite):
    """Refuse, unless --overwrite, an --out that holds a run or another range test, as training
    refuses a folder that holds a run."""
    check_folder(out)
    held = [name for name in (*RANGE_TEST_FILES, "last.pt", "metrics.json", "eval.json") if (out / name).exists()]
    if held and not overwrite:
        raise UserError(f"--out {out} already holds a run or a range test ({', '.join(held)}): choose another "
                        f"--out, or pass --overwrite to replace its {' and '.join(RANGE_TEST_FILES)}")


def resume_command(script, checkpoint, launcher=("python",)):
    """The command that continues a run, started by ``launcher`` as the run was (torchrun's)."""
    return shlex.join([*launcher, script, "--resume", str(checkpoint)])


def check_run_folder(out, outputs, ckpt, script):
    """Everything that can refuse ``out`` before any work is done (nothing is written)."""
    check_folder(out)
    last = out / "last.pt"
    if ckpt is None:
        held = [name for name in ("last.pt", "metrics.json") if (out / name).exists()]
        if held and not outputs.overwrite:
            raise UserError(f"{out} already holds a run ({', '.join(held)}): continue it with "
                            f"{resume_command(script, last)}, or pass --overwrite to replace it")
    elif last.exists() and not _same_file(last, outputs.resume):
        there = load_checkpoint(last, purpose="resume")["epoch"]
        if there > ckpt["epoch"]:
            raise UserError(f"{outputs.resume} holds epoch {ckpt['epoch']} but {last} is at epoch {there}: resuming "
                            f"would rewind {out}; resume {last}, or branch off with --out NEW_FOLDER")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def claimed_folder(out):
    """Create ``out`` and hold it while writing there; clear the temp files dead processes left."""
    make_folder(out)
    with claimed(out):
        remove_stale_temp_files(out)
        yield


@contextlib.contextmanager
def claimed_run_folder(out, outputs, ckpt):
    """Create ``out`` and hold it for the run; clear what dead processes and, with --overwrite,
    the replaced run left there."""
    with claimed_folder(out):
        if ckpt is None and outputs.overwrite:
            replaced = [name for name in REPLACED_FILES if (out / name).exists()]
            if replaced:
                print(f"--overwrite: replacing the run in {out} ({', '.join(replaced)})")
            for name in replaced:
                (out / name).unlink()
        yield

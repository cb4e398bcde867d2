"""Continuing a run from its checkpoint: which flags come from the command line and which from
the checkpoint, and every piece of state that makes the continued run the one that stopped.

How exact that is depends on the device: on the CPU the resumed run ends with identical metrics;
on CUDA identical under --deterministic, and otherwise with the same data order and augmentation
but not bit for bit (cuDNN's autotuned algorithms and atomic-add kernels vary from run to run).
"""

import dataclasses

import torch

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """The command line that started this process: its ``text`` (metrics.json keeps it, so a run
    can be repeated), the dests of the flags typed on it (``given``), and those of the flags that
    say where and how to run (``resumable``, as the parser marks them): on --resume these come
    from the command line, every other flag from the checkpoint, so the run goes on unchanged."""

    text: str
    given: frozenset = frozenset()
    resumable: frozenset = frozenset()


def _spelled(dest, value):
    flag = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def refuse_changed_flags(command_line, flags, saved, path):
    """A resume continues the run that stopped, so a training flag typed now (``flags``: this
    command line's, {dest: value}) must equal the checkpoint's (``saved``), or the run is refused
    in one line that names each: nothing would say that the value was dropped."""
    typed = command_line.given - command_line.resumable
    changed = sorted(dest for dest in typed if dest in saved and saved[dest] != flags[dest])
    if changed:
        listed = "; ".join(f"{_spelled(d, flags[d])} (the run has {_spelled(d, saved[d])})" for d in changed)
        raise UserError(f"--resume continues {path} as it started: {listed}. A run's training flags cannot change "
                        f"mid-run (the one-cycle schedule is fixed by --epochs and the LR flags, the model and data "
                        f"by theirs): drop them, or start a new run with them")


def merge_resume_flags(flags, saved, resumable):
    """The flags ({dest: value}) of a resumed run: the checkpoint's ``saved`` flags, with the
    ``resumable`` ones given on this command line (``flags``) laid over them. --out is this command
    line's alone: without it a resume writes beside its checkpoint, never into the folder the run
    was started in. A flag newer than the checkpoint takes this command line's value, which is its
    default unless given."""
    merged = {key: value if key in resumable and value is not None else saved.get(key, value)
              for key, value in flags.items()}
    merged["out"] = flags["out"]
    return merged


def rng_state(order_gen, aug_gen):
    """The generators a run draws from: torch's CPU one (initialization), the data order's and the
    augmentation's. Not the default CUDA generators, which nothing in training draws from: saving
    one state per visible GPU made a checkpoint from a machine with more GPUs fail to resume."""
    return {"torch": torch.get_rng_state(), "order": order_gen.get_state(), "aug": aug_gen.get_state(),
            "aug_device": aug_gen.device.type}


def set_rng_state(state, order_gen, aug_gen, path):
    """Put back every generator a run draws from. The augmentation generator lives on the training
    device, and each kind of device has its own generator, so its state cannot move to another
    kind: such a resume could not be exact, and is refused (evaluation is not)."""
    saved, here = state["aug_device"], aug_gen.device.type
    if saved != here:
        raise UserError(f"{path} was trained on {saved} and this run is on {here}: an exact resume needs the same "
                        f"kind of device, so resume with --device {saved} (--eval-only runs anywhere)")
    aug_gen.set_state(state["aug"])
    torch.set_rng_state(state["torch"])
    order_gen.set_state(state["order"])


def restore(ckpt, run, schedule, scaler, path):
    """Load the checkpoint's training state into a freshly built run: the continued run starts
    where ``ckpt`` stopped."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    if ckpt["scaler"]:  # empty when the run trained without fp16: a new loss scale then starts here
        scaler.load_state_dict(ckpt["scaler"])
    if run.ema:
        run.ema.load_state_dict(ckpt["ema"])
    if run.lookahead:
        run.lookahead.load_state_dict(ckpt["lookahead"])
    set_rng_state(ckpt["rng"], run.order_gen, run.aug_gen, path)

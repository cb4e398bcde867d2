"""Checkpoints that hold only tensors and plain Python values, so ``torch.load(weights_only=True)``
can read them: no pickled classes, nothing that runs code on load."""

import io
import math
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from .outputs import atomic_write_bytes

FORMAT = "cifar-toolkit-checkpoint-v2"
# Written by the project up to commit ea80de1, which still reads them; this version does not.
EARLIER_FORMATS = ("cifar-toolkit-checkpoint-v1",)
# What each use reads; a checkpoint lacking any is refused in one line rather than failing halfway.
NEEDED = {"evaluate": ("model_name", "args", "model", "mean", "std", "classes"),
          "resume": ("model_name", "args", "model", "mean", "std", "classes", "optimizer", "schedule", "scaler",
                     "rng", "epoch", "lr_bounds")}


def save_checkpoint(path, state, also=()):
    """Serialize ``state`` once and write it to ``path``, and to each of ``also`` first (as a hard
    link where it can: best.pt beside last.pt costs no second serialization or write)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue(), also=also)


def load_checkpoint(path, model_name=None, purpose=None, flag="--resume"):
    """Load and validate a checkpoint; ``model_name`` refuses one of another model, ``purpose``
    ('evaluate' or 'resume') one that lacks what that use reads, or whose normalization could
    not be applied. ``flag``: the flag that named ``path``, which the messages tell the user to fix."""
    try:
        with warnings.catch_warnings():  # a file that is not a checkpoint may claim any pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: pass {flag} PATH/last.pt of an earlier run") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a folder: pass {flag} {Path(path) / 'last.pt'}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler meets in a file that is not a checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}); "
                        f"pass the last.pt or best.pt a training run wrote") from None
    if isinstance(ckpt, dict) and ckpt.get("format") in EARLIER_FORMATS:
        raise UserError(f"{path} was written by an earlier version of this toolkit ({ckpt['format']}), which this "
                        f"version no longer reads: the project at commit ea80de1 still evaluates and resumes it "
                        f"(git checkout ea80de1), or train it again")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no '{FORMAT}' marker); "
                        f"pass the last.pt or best.pt a training run wrote")
    if model_name is not None and ckpt.get("model_name") != model_name:
        raise UserError(f"{path} holds a '{ckpt.get('model_name')}' model, but this script trains "
                        f"'{model_name}': use the matching train_*.py")
    missing = [key for key in NEEDED.get(purpose, ()) if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, so it cannot {purpose} a run: pass a last.pt or "
                        f"best.pt a training run wrote")
    if purpose is not None:
        for key in ("mean", "std"):
            _check_channel_stats(path, key, ckpt[key])
    return ckpt


def _check_channel_stats(path, key, values):
    """A checkpoint's per-channel ``mean`` or ``std``, which every image is normalized with: three
    finite numbers, each std above 0 (a zero std turns every probability into nan)."""
    ok = isinstance(values, (list, tuple)) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if ok and key == "std":
        ok = all(v > 0 for v in values)
    if not ok:
        need = "three numbers above 0" if key == "std" else "three finite numbers"
        raise UserError(f"{path}'s {key} {values!r} is not {need}, one per colour channel: pass the last.pt or "
                        f"best.pt a training run wrote")

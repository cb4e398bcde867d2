"""Run outputs written atomically (temp file, then rename), so an interrupted run never leaves
a half-written file where a complete one stood; the output folder checked before any work,
claimed by one run at a time, and cleared of temp files that dead processes left."""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..errors import UserError

HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                  "epoch_time_s"]
LOCK_NAME = ".lock"
# How long a lock that names no process counts as one being written, not as a dead one's.
NAMELESS_LOCK_GRACE_S = 5.0
_TEMP_FILE = re.compile(r"\.tmp(\d+)(\.png|\.npz)?$")  # what temp_path names, with a figure's or cache's suffix


def temp_path(path, suffix=""):
    """The temp file a write to ``path`` goes through: beside it, so the rename stays on one file
    system, and named after this process, so a leftover can be told from a live write."""
    return f"{path}.tmp{os.getpid()}{suffix}"


def write_failed(path, exc, tmp):
    """A UserError for a write to ``path`` that failed with ``exc``, once ``tmp`` is removed, so a
    full disk is not left fuller."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return UserError(f"could not write {path} ({exc.strerror or exc}): free some space, or choose a writable "
                     f"folder with --out")


def atomic_write_bytes(path, data, also=()):
    """Write ``data`` to ``path`` through a temp file. ``also``: more paths that get the same file,
    each put in place before ``path`` (so a kill between leaves none of them older than it), as a
    hard link to the one written file, or as a copy where the file system has no hard links."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for other in also:
            _link_or_copy(tmp, other)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path, exc, tmp) from None


def _link_or_copy(source, path):
    """Put ``source``'s file at ``path`` atomically. A later write replaces each path by a rename,
    never in place, so a link keeps the bytes it was made with."""
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (FAT, some network and container file systems)
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_history_csv(path, history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def check_folder(folder, flag="--out"):
    """Refuse, in one line, a folder that cannot be written, before any work is done: a file in
    its place, or a first existing ancestor that refuses a file (read-only, no permission).
    Nothing is created: a run that fails later on bad input leaves no folder behind."""
    folder = Path(folder)
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        raise UserError(f"{flag} {folder} {where}, not a folder: choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({exc.strerror or exc}): "
                        f"choose another {flag}") from None


def make_folder(folder, flag="--out"):
    check_folder(folder, flag)
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot create it ({exc.strerror or exc})") from None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder):
    """Delete the temp files of writes that a process killed mid-write left in ``folder``."""
    for path in Path(folder).iterdir():
        match = _TEMP_FILE.search(path.name)
        if match and path.is_file() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def _takeovers_serialized(folder):
    """Only one process at a time may remove a stale lock from ``folder``: an flock on the folder
    itself, which the kernel drops when its holder dies, so this mutex can never go stale. Where
    there is no flock (Windows), takeovers are not serialized."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # which releases the flock


def _lock_holder(lock):
    """The pid a lock file names; None once it is gone, 0 for a file that names none."""
    try:
        return int(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0


def _publish_lock(mine, lock):
    """Put the complete file ``mine`` at ``lock`` unless a lock is there: a hard link, which fails
    if ``lock`` exists, so no reader ever sees the lock without its pid."""
    try:
        os.link(mine, lock)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network and container file systems)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))


def _remove_if_stale(lock, folder):
    """Remove ``lock`` if the process it names has died, or refuse in one line while it lives. The
    holder is read again under the takeover mutex, so the file removed is the dead one: a live
    holder's lock can be removed only by that holder."""
    with _takeovers_serialized(folder):
        holder = _lock_holder(lock)
        if holder is None:
            return
        if holder and holder != os.getpid() and _alive(holder):
            raise UserError(f"another run (process {holder}) is writing into {folder}: wait for it to end, or "
                            f"choose another --out (if no run is writing there, delete {lock})")
        if not holder and _younger_than(lock, NAMELESS_LOCK_GRACE_S):
            # A lock without a pid is being written where there are no hard links (_publish_lock)
            raise UserError(f"another run is starting in {folder}: wait for it, or choose another --out")
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _younger_than(path, seconds):
    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def claimed(folder):
    """Hold ``folder`` for this run: a lock file naming this process, refused while another live
    process holds it, taken over when its holder died without removing it. The pid is written
    before the lock appears under its name, so a process never takes a lock being written for
    stale."""
    lock = Path(folder) / LOCK_NAME
    mine = Path(temp_path(lock))
    mine.write_text(str(os.getpid()))
    try:
        for _ in range(3):
            try:
                _publish_lock(mine, lock)
                break
            except FileExistsError:
                _remove_if_stale(lock, folder)
        else:
            raise UserError(f"could not claim {folder} ({lock} keeps coming back): is another run starting there?")
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()

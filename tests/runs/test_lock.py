"""The run-folder lock: one holder at a time, however many processes enter it together."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from core.errors import UserError
from core.runs import outputs

TRIALS, PROCESSES = 40, 6


def _enter(folder, start, inside, most, refused):
    """One process: wait for the others, enter claimed(), count the holders while inside."""
    start.wait()
    try:
        with outputs.claimed(folder):
            with inside.get_lock():
                inside.value += 1
                most.value = max(most.value, inside.value)
            time.sleep(0.02)
            with inside.get_lock():
                inside.value -= 1
    except UserError:
        with refused.get_lock():
            refused.value += 1


def _dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its processes")
def test_processes_entering_the_lock_together_never_hold_it_at_once(tmp_path):
    """Every other trial starts from a stale lock, which exactly one of them takes over at a time."""
    ctx = multiprocessing.get_context("fork")
    dead = _dead_pid()
    for trial in range(TRIALS):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        if trial % 2:
            (folder / outputs.LOCK_NAME).write_text(str(dead))
        start = ctx.Barrier(PROCESSES)
        inside, most, refused = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
        procs = [ctx.Process(target=_enter, args=(folder, start, inside, most, refused)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert most.value == 1, f"trial {trial}: {most.value} holders at once"
        assert refused.value < PROCESSES, f"trial {trial}: nobody took the lock"
        assert not (folder / outputs.LOCK_NAME).exists(), "the last holder removes its lock"
        assert [p.name for p in folder.iterdir()] == [], "no temp file of the lock is left"


def test_a_lock_of_a_live_process_refuses_and_says_how_to_clear_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / outputs.LOCK_NAME).write_text(str(holder.pid))
        with pytest.raises(UserError, match=f"process {holder.pid}.*delete {tmp_path / outputs.LOCK_NAME}"):
            with outputs.claimed(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / outputs.LOCK_NAME).read_text() == str(holder.pid), "a refused claim leaves the lock alone"
    with outputs.claimed(tmp_path):  # its holder is dead now: taken over
        assert (tmp_path / outputs.LOCK_NAME).read_text() == str(os.getpid())


def test_the_lock_holds_its_pid_from_the_moment_it_appears(tmp_path, monkeypatch):
    """What the race came from: a lock visible before its pid was written."""
    seen = []
    real_link = os.link

    def link_and_read(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        seen.append((tmp_path / outputs.LOCK_NAME).read_text())

    monkeypatch.setattr(os, "link", link_and_read)
    with outputs.claimed(tmp_path):
        pass
    assert seen == [str(os.getpid())]


def test_a_lock_without_a_pid_is_one_being_written_until_it_is_old(tmp_path):
    """Where there are no hard links the pid follows the lock's creation: a fresh empty lock is a
    run starting, an old one a run that died before it wrote its pid."""
    lock = tmp_path / outputs.LOCK_NAME
    lock.write_text("")
    with pytest.raises(UserError, match="another run is starting"):
        with outputs.claimed(tmp_path):
            pass
    old = time.time() - 2 * outputs.NAMELESS_LOCK_GRACE_S
    os.utime(lock, (old, old))
    with outputs.claimed(tmp_path):
        assert lock.read_text() == str(os.getpid())

"""Every train script under torchrun, 2 processes on the CPU with gloo, against its single-process
definition: one process with ghost BatchNorm over the 2 shares of each batch. Then the faults: the
job killed mid-epoch and resumed, one process killed, and a 2-machine launch on localhost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import metrics, tiny_run
from torch import nn

from core.cli.commands import train_main
from core.models import MODELS
from core.runs.checkpoint import load_checkpoint
from core.train import engine
from core.train.distributed import World, average_buffers

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
BATCH = 50


def torchrun(*launch):
    return [sys.executable, "-m", "torch.distributed.run", *launch]


def standalone(script, *flags):
    return torchrun("--standalone", "--nproc-per-node", "2", script, *flags)


def run_flags(data, out, *extra, epochs=2):
    # fp32: the equivalence holds to float rounding, which bf16 would hide
    return tiny_run(data, out, "--amp", "off", "--train-subset", "100", "--test-subset", "50", *extra, epochs=epochs)


def model_flags(model):
    """The ResNet, the costliest, trains 3 steps in one epoch; the racing net 3 epochs of 2 steps,
    so that its Lookahead pulls once (every 5 steps) before the run ends on its slow weights; the
    others 2 epochs of 2 steps."""
    return {"resnet": ["--train-subset", "150", "--epochs", "1"], "fast": ["--epochs", "3"]}.get(model, [])


def launch(command, **kwargs):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory):
    """Each script's 2-process run, launched once for the tests below."""
    runs = {}

    def of(model):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"ddp-{model}")
            proc = launch(standalone(f"train_{model}.py", *run_flags(data, out, *model_flags(model))))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[model] = out, proc
        return runs[model]

    return of


def train_step_by_shares(shares):
    """A training step of one process that runs each of ``shares`` equal slices of the batch on
    its own and averages their gradients: BatchNorm normalizes each slice over itself (ghost
    BatchNorm over the slices), with the very kernels each torchrun process runs on its share."""
    def step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler):
        optimizer.zero_grad(set_to_none=True)
        losses, logits = [], []
        for x_share, y_share in zip(x.chunk(shares), y.chunk(shares)):
            out = model(x_share)
            loss = loss_fn(out, y_share)
            scaler.scale(loss / shares).backward()
            losses.append(loss.detach())
            logits.append(out.detach())
        scaler.step(optimizer)
        scaler.update()
        return torch.stack(losses).mean(), torch.cat(logits)
    return step


@pytest.fixture
def one_thread():
    """One thread, as torchrun gives each of its processes: a reduction over two threads adds in
    another order, and through BatchNorm's backward such last-bit differences grow step by step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model", ["resnet", "dilated", "ultimus", "fast"])
def test_two_processes_train_what_one_process_with_ghost_batch_norm_over_their_shares_trains(
        model, data, ddp_runs, tmp_path, monkeypatch, one_thread):
    out, proc = ddp_runs(model)
    assert proc.stdout.count("Best test accuracy") == 1, "one process prints"
    monkeypatch.setattr(engine, "train_step", train_step_by_shares(2))
    assert train_main(model, run_flags(data, tmp_path / "one", *model_flags(model))) == 0
    two, one = (load_checkpoint(p / "last.pt")["model"] for p in (out, tmp_path / "one"))
    parameters = [name for name, _ in MODELS[model]().named_parameters()]
    assert parameters and set(parameters) <= two.keys()
    for key in parameters:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)
    m_two, m_one = metrics(out), metrics(tmp_path / "one")
    assert m_two["processes"] == 2 and m_one["processes"] == 1
    for a, b in zip(m_two["history"], m_one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["train_acc"] == pytest.approx(b["train_acc"])
    assert m_two["train_images"] == m_one["train_images"] and m_two["timing"]["train_s"] > 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir()), "every output, written once"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files or lock left behind"


def test_the_final_evaluation_of_two_processes_is_one_process_s_evaluation_of_their_checkpoint(
        data, ddp_runs, tmp_path):
    out, _ = ddp_runs("ultimus")
    assert train_main("ultimus", ["--eval-only", "--resume", str(out / "last.pt"), "--out", str(tmp_path / "eval"),
                                  "--test-subset", "50", "--device", "cpu", "--cache-dir", "none", "--amp", "off",
                                  "--no-progress"]) == 0
    evaluated, trained = json.loads((tmp_path / "eval" / "eval.json").read_text()), metrics(out)
    assert evaluated["test_acc"] == trained["final_test_acc"]
    assert evaluated["confusion"] == trained["confusion"]
    assert evaluated["per_class_acc"] == trained["per_class_acc"]


def wait_for_epochs(out, epochs, proc, timeout=120):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if len(metrics(out)["history"]) >= epochs:
                return
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    pytest.fail(f"no epoch {epochs} within {timeout} s")


def test_a_job_killed_mid_epoch_resumes_under_torchrun_to_the_uninterrupted_metrics(data, ddp_runs, tmp_path):
    straight, _ = ddp_runs("dilated")
    out = tmp_path / "killed"
    job = subprocess.Popen(standalone("train_dilated.py", *run_flags(data, out)), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_epochs(out, 1, job)
    kill_job(job)
    assert len(metrics(out)["history"]) == 1, "killed in the second and last epoch"
    resumed = launch(standalone("train_dilated.py", "--resume", str(out / "last.pt"), "--no-progress"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning" not in resumed.stderr
    keys = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")
    assert [[row[k] for k in keys] for row in metrics(out)["history"]] == \
        [[row[k] for k in keys] for row in metrics(straight)["history"]]


def kill_job(job):
    """kill -9 of torchrun and of each of its workers (every worker runs in a session of its own,
    so killing torchrun's process group would leave them training)."""
    for pid, _ in children(job.pid):
        os.kill(pid, signal.SIGKILL)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def children(pid):
    """The processes whose parent is ``pid``, with their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append((int(entry.name), environ))
    return found


def job_in_its_second_epoch(data, out):
    """A 2-process job of 50 epochs that has just finished its first, its stderr piped."""
    job = subprocess.Popen(standalone("train_dilated.py", *run_flags(data, out, epochs=50)), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_epochs(out, 1, job)
    return job


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_one_killed_process_stops_the_job_within_a_minute_and_last_pt_still_loads(data, tmp_path):
    out = tmp_path / "run"
    job = job_in_its_second_epoch(data, out)
    try:
        rank1 = [pid for pid, env in children(job.pid) if env.get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        start = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        assert time.monotonic() - start < 60
    finally:
        if job.poll() is None:
            kill_job(job)
    assert job.returncode != 0
    assert "rank: 1" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-2000:]
    assert load_checkpoint(out / "last.pt", "dilated", purpose="resume")["epoch"] >= 1


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_machines_on_localhost_train_what_one_machine_with_two_processes_trains(data, ddp_runs, tmp_path):
    out, _ = ddp_runs("ultimus")
    endpoint = f"localhost:{free_port()}"
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                                       "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                                       "train_ultimus.py", *run_flags(data, tmp_path / "nodes")),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # as --standalone sets for 2 per node
             for rank in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    two_nodes, one_node = (load_checkpoint(p / "last.pt")["model"] for p in (tmp_path / "nodes", out))
    for key in one_node:
        torch.testing.assert_close(two_nodes[key], one_node[key], atol=1e-5, rtol=0, msg=key)
    assert metrics(tmp_path / "nodes")["processes"] == 2


def test_ctrl_c_stops_every_process_and_rank_0_alone_prints_the_resume_command(data, tmp_path):
    out = tmp_path / "run"
    job = job_in_its_second_epoch(data, out)
    try:
        os.kill(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends torchrun, which passes it on
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            kill_job(job)
    assert job.returncode != 0
    command = f"torchrun --standalone --nproc-per-node=2 train_dilated.py --resume {out / 'last.pt'}"
    assert stderr.count("Interrupted.") == 1 and command in stderr, stderr[-3000:]
    assert load_checkpoint(out / "last.pt", "dilated", purpose="resume")["epoch"] >= 1


def test_resumed_in_one_process_a_two_process_run_says_in_one_line_what_changes(data, ddp_runs, tmp_path, capsys):
    out, _ = ddp_runs("ultimus")
    assert train_main("ultimus", ["--resume", str(out / "last.pt"), "--out", str(tmp_path / "branch"),
                                  "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "trained on 2 process(es) and continues on 1" in warnings[0]
    assert "shares of 50 images instead of 25" in warnings[0]


def average_buffers_of_rank(rank, port, results):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(rank + 1.0)
    bn.running_var.fill_(10.0 * (rank + 1))
    average_buffers([bn], World(rank, 2))
    results[rank] = (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
    torch.distributed.destroy_process_group()


def test_the_batch_norm_statistics_are_averaged_over_the_processes():
    """Both processes hold the mean of their running statistics afterwards; the step counts,
    equal in every process, are left alone."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(average_buffers_of_rank, args=(free_port(), results), nprocs=2)
    assert results[0] == results[1] == ([1.5] * 3, [15.0] * 3, 0)

"""train_fast.py end to end on tiny synthetic data: airbench's recipe on the toolkit's machinery,
its exact resume after kill -9, and its checkpoints in --eval-only and predict.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
import train_dilated
import train_fast
from core.runs.checkpoint import load_checkpoint
from tests.conftest import ctrl_c_in_second_epoch, metrics, one_error_line, synthetic_images, tiny_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(100, 20)


def tiny(data, out, *extra):
    """Three epochs of two steps; the whitening bias trains in the first alone."""
    return tiny_run(data, out, "--whiten-bias-epochs", "1", *extra, epochs=3)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    assert train_fast.main(tiny(data, out)) == 0
    return out


def same_run(a, b):
    assert [h["train_loss"] for h in metrics(a)["history"]] == [h["train_loss"] for h in metrics(b)["history"]]
    assert metrics(a)["final_test_acc"] == metrics(b)["final_test_acc"]
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    for key in ("model", "optimizer"):
        assert all(torch.equal(x, y) for x, y in zip(flat(ca[key]), flat(cb[key]))), key
    assert all(torch.equal(x, y) for x, y in zip(ca["lookahead"]["slow"], cb["lookahead"]["slow"]))


def flat(state):
    if isinstance(state, dict):
        return [t for v in state.values() for t in flat(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in flat(v)]
    return [state] if isinstance(state, torch.Tensor) else []


@pytest.mark.slow
def test_the_recipe_trains_as_airbench_does(straight, capsys):
    m = metrics(straight)
    flags = m["flags"]
    assert (flags["lookahead"], flags["flip"], flags["tta_shift"], flags["momentum"]) == (True, "alternating", 1, 0.85)
    assert [h["test_acc"] is None for h in m["history"]] == [True, True, False], "evaluated after the last epoch alone"
    ckpt = load_checkpoint(straight / "last.pt", "fast")
    assert ckpt["lookahead"]["steps"] == 3 * 2
    assert torch.equal(ckpt["model"]["whiten.weight"], ckpt["lookahead"]["slow"][0]), "the run ends on the slow weights"
    groups = ckpt["optimizer"]["param_groups"]
    assert [g.get("train_steps") for g in groups].count(2) == 1  # the whitening bias: one epoch of two steps
    assert {g["orthogonalize"] for g in groups} == {True, False}, "Muon for the filters, SGD for the rest"
    assert m["timing"]["total_s"] > 0
    assert all(h["lr"] > 0 for h in m["history"]), "the log shows the schedule's LR, not the frozen group's"


@pytest.mark.slow
def test_the_whitening_bias_stops_after_its_epochs_and_the_filters_never_train(data, tmp_path, monkeypatch):
    """Without Lookahead, which pulls every weight (frozen or not) towards its slow copy, as airbench's does."""
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_fast.main(tiny(data, tmp_path, "--no-lookahead")) == 130
    after_one = load_checkpoint(tmp_path / "last.pt")["model"]
    assert train_fast.main(["--resume", str(tmp_path / "last.pt"), "--no-progress"]) == 0
    final = load_checkpoint(tmp_path / "last.pt")["model"]
    assert torch.equal(after_one["whiten.bias"], final["whiten.bias"])
    assert torch.equal(after_one["whiten.weight"], final["whiten.weight"])
    assert not torch.equal(after_one["head.weight"], final["head.weight"])


@pytest.mark.slow
def test_resume_after_kill_9_finishes_the_same_run(data, straight, tmp_path):
    """A real SIGKILL wherever it lands after the first checkpoint: last.pt is whole, and the
    resumed run ends with the uninterrupted one's weights, optimizer, average and accuracy."""
    command = [sys.executable, "train_fast.py", *tiny(data, tmp_path)]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.json").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] >= 1
    assert train_fast.main(["--resume", str(tmp_path / "last.pt"), "--no-progress"]) == 0
    same_run(tmp_path, straight)


@pytest.mark.slow
def test_eval_only_and_predict_read_its_checkpoints(data, straight, tmp_path, capsys):
    assert train_fast.main(["--eval-only", "--resume", str(straight / "last.pt"), "--data", str(data), "--out",
                            str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none", "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["test_acc"] == metrics(straight)["final_test_acc"]
    capsys.readouterr()
    image = tmp_path / "cat.png"
    Image.fromarray(synthetic_images(1, seed=1)[0][0].transpose(1, 2, 0)).save(image)
    assert predict.main([str(image), "--checkpoint", str(straight / "best.pt"), "--json", "--device", "cpu"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert len(answer["topk"]) == 3


@pytest.mark.parametrize("extra, named", [
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum is SGD's"),
    (["--lr-end", "2"], "--lr-end 2.0 must be below --lr-max"),
    (["--optimizer", "sgd", "--muon-lr-scale", "0.2"], "add --optimizer muon"),
    (["--cycle-momentum"], "keeps its momenta fixed"),
])
def test_contradictory_schedule_flags_are_refused(data, tmp_path, capsys, extra, named):
    assert train_fast.main(tiny(data, tmp_path / "run", *extra)) == 1
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_freezing_a_whitening_bias_the_model_lacks_is_refused(data, tmp_path, capsys):
    assert train_dilated.main(tiny_run(data, tmp_path / "run", "--whiten-bias-epochs", "1", epochs=1)) == 1
    assert "has none: drop it" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_sgd_run_resumes_exactly(data, tmp_path, monkeypatch):
    """airbench94's own optimizer: SGD alone; the default run (Muon and SGD in one optimizer) is
    the kill -9 test's."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_fast.main(tiny(data, straight, "--optimizer", "sgd")) == 0
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_fast.main(tiny(data, resumed, "--optimizer", "sgd")) == 130
    assert train_fast.main(["--resume", str(resumed / "last.pt"), "--no-progress"]) == 0
    same_run(resumed, straight)
    assert "orthogonalize" not in load_checkpoint(straight / "last.pt")["optimizer"]["param_groups"][0]


def test_lookahead_on_a_run_shorter_than_its_interval_is_refused(data, tmp_path, capsys):
    """Its run ends on the slow weights, pulled every 5 steps: with fewer steps, the initial ones."""
    assert train_fast.main(tiny_run(data, tmp_path / "run", epochs=2)) == 1
    assert "Add --no-lookahead" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()

"""--val-split: a class-balanced held-out part of the training split, scored every epoch, that
chooses best.pt; the same images for every seed; never trained on."""

import functools
import json

import numpy as np
import pytest
import torch

import lr_range_test
import train_dilated
import train_ultimus
from core.cli.parsers import parse_run_config
from core.data.dataset import Split
from core.data.subsets import hold_out
from core.runs.checkpoint import load_checkpoint
from core.train.recipes import RECIPES
from core.train.setup import BuiltRun
from tests.conftest import ctrl_c_in_second_epoch, epoch_figures, metrics, one_error_line, tiny_run


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(300, 60)


tiny = functools.partial(tiny_run, epochs=4, lr=(0.01, 0.001))


def test_hold_out_splits_the_images_into_two_disjoint_class_balanced_parts():
    labels = np.random.default_rng(0).integers(0, 10, 400)
    images = np.arange(400).reshape(400, 1, 1, 1).repeat(3, 1)  # each image carries its index
    train, val = hold_out(Split(images, labels), 57, 10)
    held, kept = val.images[:, 0, 0, 0], train.images[:, 0, 0, 0]
    assert len(held) == 57 and len(kept) == 343 and not set(held) & set(kept)
    assert sorted([*held, *kept]) == list(range(400))
    counts = np.bincount(val.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    # the first images of each class, in dataset order: the same for every caller
    for c in range(10):
        assert set(held[val.labels == c]) == set(np.flatnonzero(labels == c)[:counts[c]])
    assert hold_out(Split(images, labels), 0, 10) == (Split(images, labels), None)


def setup_for(data, *extra):
    return BuiltRun(RECIPES["ultimus"], parse_run_config(RECIPES["ultimus"], tiny(data, "unused", *extra)))


def test_the_held_out_images_are_the_same_for_every_seed_and_never_in_a_training_batch(data):
    a, b = setup_for(data, "--val-split", "60"), setup_for(data, "--val-split", "60", "--seed", "7")
    assert torch.equal(torch.as_tensor(a.val.images), torch.as_tensor(b.val.images))
    held = {img.tobytes() for img in a.val.images}
    assert len(a.train.labels) == 240 and not held & {img.tobytes() for img in a.train.images}
    seen = {img.tobytes() for img in a.train_loader.images.cpu().numpy()}
    assert not held & seen
    # the channel statistics come from the images that train, not the held-out ones
    plain = setup_for(data)
    assert a.mean != plain.mean


@pytest.mark.slow
def test_a_run_scores_the_validation_split_every_epoch_and_chooses_best_by_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, "--val-split", "60")) == 0
    m = metrics(out)
    assert m["train_images"] == 240 and m["val_images"] == 60 and m["best_by"] == "val_acc"
    assert all(h["val_acc"] is not None and h["val_loss"] > 0 for h in m["history"])
    best = max(m["history"], key=lambda h: h["val_acc"])  # the first of equals, as a strict > keeps
    assert m["best_epoch"] == best["epoch"] and m["best_val_acc"] == best["val_acc"]
    assert m["best_test_acc"] == best["test_acc"] and m["final_val_acc"] == m["history"][-1]["val_acc"]
    assert load_checkpoint(out / "best.pt", "ultimus", purpose="resume")["epoch"] == best["epoch"]
    assert "val_acc" in (out / "metrics.csv").read_text().splitlines()[0]
    log = capsys.readouterr().out
    assert log.count("Validation set: Average loss") == 4
    # the test split is scored every epoch (above) but printed after the last only
    assert log.count("Test set: Average loss") == 1 and log.rindex("Test set") > log.rindex("EPOCH: 4")


@pytest.mark.slow
def test_without_a_validation_split_best_is_chosen_by_the_test_split(data, tmp_path):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out)) == 0
    m = metrics(out)
    assert m["best_by"] == "test_acc" and m["val_images"] == 0 and m["best_val_acc"] is None
    assert all(h["val_acc"] is None for h in m["history"])
    assert m["best_test_acc"] == max(h["test_acc"] for h in m["history"])


@pytest.mark.slow
def test_a_resumed_run_with_a_validation_split_matches_the_uninterrupted_one(data, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_ultimus.main(tiny(data, straight, "--val-split", "60")) == 0
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny(data, resumed, "--val-split", "60")) == 130
    assert train_ultimus.main(["--resume", str(resumed / "last.pt"), "--no-progress"]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert epoch_figures(straight) == epoch_figures(resumed)
    assert (a["best_epoch"], a["best_val_acc"]) == (b["best_epoch"], b["best_val_acc"])
    assert train_ultimus.main(["--resume", str(resumed / "last.pt"), "--val-split", "30"]) == 1


@pytest.mark.slow
def test_runs_report_the_validation_spread(data, tmp_path):
    out = tmp_path / "many"
    assert train_ultimus.main(tiny(data, out, "--val-split", "60", "--runs", "2", "--epochs", "2")) == 0
    summary = json.loads((out / "runs.json").read_text())
    vals = [metrics(out / f"seed{s}")["final_val_acc"] for s in (0, 1)]
    assert summary["final_val_acc"] == vals and summary["val"]["mean"] == pytest.approx(np.mean(vals))


def test_a_validation_split_that_leaves_nothing_to_train_is_one_line(data, tmp_path, capsys):
    assert train_ultimus.main(tiny(data, tmp_path / "x", "--val-split", "300")) == 1
    assert "--val-split 300" in one_error_line(capsys)
    assert train_ultimus.main(tiny(data, tmp_path / "y", "--val-split", "280")) == 1  # 20 < --batch-size 50
    assert "--batch-size" in one_error_line(capsys)


@pytest.mark.slow
def test_the_range_test_records_the_validation_loss_with_a_validation_split(data, tmp_path):
    out = tmp_path / "lr"
    assert lr_range_test.main(["--model", "ultimus", "--data", str(data), "--out", str(out), "--cache-dir", "none",
                               "--device", "cpu", "--batch-size", "50", "--num-iter", "5", "--val-split", "60"]) == 0
    record = json.loads((out / "lr_finder.json").read_text())
    assert record["loss_kind"] == "val" and record["args"]["val_split"] == 60


def score(script, data, checkpoint, out, *extra):
    """``script``'s --eval-only of ``checkpoint`` into ``out``: its eval.json."""
    assert script.main(["--eval-only", "--resume", str(checkpoint), "--data", str(data), "--out", str(out),
                        "--device", "cpu", "--cache-dir", "none", *extra]) == 0
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_eval_only_scores_the_runs_validation_split_with_the_average_or_the_live_weights(data, tmp_path, capsys):
    """The average only reads the live weights, so the live weights of an --ema-decay run are
    those of the same run without it: --live-weights must score what that run scored."""
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    assert train_ultimus.main(tiny(data, plain, "--val-split", "60")) == 0
    assert train_ultimus.main(tiny(data, averaged, "--val-split", "60", "--ema-decay", "0.8")) == 0
    final, final_plain = metrics(averaged)["history"][-1], metrics(plain)["history"][-1]
    assert final["val_loss"] != final_plain["val_loss"]
    capsys.readouterr()
    average = score(train_ultimus, data, averaged / "last.pt", tmp_path / "e1", "--eval-split", "val")
    log = capsys.readouterr().out
    assert "Validation set: Average loss" in log and "Per-class validation accuracy" in log and "Test set" not in log
    assert (average["split"], average["weights"], average["total"]) == ("val", "ema", 60)
    assert (average["val_acc"], average["val_loss"]) == (final["val_acc"], pytest.approx(final["val_loss"]))
    live = score(train_ultimus, data, averaged / "last.pt", tmp_path / "e2", "--eval-split", "val", "--live-weights")
    assert live["weights"] == "model"
    assert (live["val_acc"], live["val_loss"]) == (final_plain["val_acc"], pytest.approx(final_plain["val_loss"]))
    test = score(train_ultimus, data, averaged / "last.pt", tmp_path / "e3")
    assert (test["split"], test["test_acc"]) == ("test", final["test_acc"]) and "val_acc" not in test


@pytest.mark.slow
def test_eval_only_recalibrates_bn_on_the_runs_training_images_not_the_held_out_ones(data, tmp_path):
    """--recalibrate-bn in training reads the first images of the run's training part (and leaves
    training alone); the first images of the whole split are the held-out ones, which must not
    leak in. So --eval-only with the flag, on a run trained without it, must score what the
    flagged run scored."""
    plain, recal = tmp_path / "plain", tmp_path / "recal"
    assert train_dilated.main(tiny(data, plain, "--val-split", "60", "--epochs", "2")) == 0
    assert train_dilated.main(tiny(data, recal, "--val-split", "60", "--epochs", "2", "--recalibrate-bn", "60")) == 0
    final = metrics(recal)["history"][-1]
    assert metrics(plain)["history"][-1]["val_loss"] != pytest.approx(final["val_loss"])  # the statistics changed
    again = score(train_dilated, data, plain / "last.pt", tmp_path / "e", "--eval-split", "val", "--recalibrate-bn", "60")
    assert (again["val_acc"], again["val_loss"]) == (final["val_acc"], pytest.approx(final["val_loss"]))
    test = score(train_dilated, data, plain / "last.pt", tmp_path / "t", "--recalibrate-bn", "60")
    assert test["test_loss"] == pytest.approx(final["test_loss"])


@pytest.mark.slow
def test_eval_split_and_live_weights_refusals_are_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, "--epochs", "2")) == 0
    for extra in (["--eval-split", "val"], ["--live-weights"]):
        assert train_ultimus.main(tiny(data, tmp_path / "x", *extra)) == 1
        assert "add --eval-only" in one_error_line(capsys)
    assert train_ultimus.main(["--eval-only", "--resume", str(out / "last.pt"), "--data", str(data),
                               "--cache-dir", "none", "--eval-split", "val", "--out", str(tmp_path / "e")]) == 1
    assert "trained without --val-split" in one_error_line(capsys)

"""lr_range_test.py, --lr-max find / --lr-from, --runs, and the dilated and Ultimus scripts, end to end."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

import lr_range_test
import train_dilated
import train_resnet
import train_ultimus
from core.cli import commands
from core.cli.parsers import parse_run_config
from core.train.recipes import RECIPES
from tests.conftest import assert_drawn


def common(data, out):
    return ["--data", str(data), "--out", str(out), "--device", "cpu", "--cache-dir", "none", "--no-progress"]


def read(path):
    return json.loads(Path(path).read_text())


@pytest.mark.slow
def test_range_test_cli_writes_a_geometric_sweep_and_bounds(data, tmp_path, capsys):
    args = ["--model", "dilated", *common(data, tmp_path), "--batch-size", "50", "--num-iter", "12",
            "--start-lr", "1e-5", "--end-lr", "10"]
    assert lr_range_test.main(args) == 0
    record = read(tmp_path / "lr_finder.json")
    lrs = np.asarray(record["lrs"])
    assert lrs[0] == pytest.approx(1e-5)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, (10 / 1e-5) ** (1 / 11)), "geometric from start_lr, reaching end_lr at step 12"
    assert {"losses", "raw_losses", "lr_max", "lr_min", "method", "lr_min_method", "args", "suggestions"} <= set(record)
    assert 0 < record["lr_min"] < record["lr_max"] <= lrs[int(np.argmin(record["losses"]))]
    assert (record["method"], record["lr_min_method"]) == ("min_div_2", "lr_max/1000")  # SGD's default reading
    assert_drawn(tmp_path / "lr_finder.png")
    printed = capsys.readouterr().out
    assert "python train_dilated.py --lr-max" in printed and "--lr-from" in printed


@pytest.mark.slow
@pytest.mark.parametrize("extra, method, lr_min_method", [
    (["--optimizer", "adam"], "conservative", "lr_max/1000"),
    (["--optimizer", "adam", "--method", "steepest"], "steepest", "lr_max/1000"),
])
def test_range_test_reads_by_the_optimizer_unless_told(data, tmp_path, extra, method, lr_min_method):
    args = ["--model", "ultimus", *common(data, tmp_path), "--batch-size", "50", "--num-iter", "12", *extra]
    assert lr_range_test.main(args) == 0
    record = read(tmp_path / "lr_finder.json")
    assert (record["method"], record["lr_min_method"]) == (method, lr_min_method)
    assert record["lr_max"] == record["suggestions"][method]


def swept_groups(monkeypatch):
    """(weight decay, LR scale, parameter count) of each group the range test's optimizer holds."""
    seen = []
    real = commands.find_bounds

    def recording(model, optimizer, *args, **kwargs):
        seen.extend((g["weight_decay"], g.get("lr_scale", 1.0), len(g["params"])) for g in optimizer.param_groups)
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(commands, "find_bounds", recording)
    return seen


def trained_with(printed, model):
    """The param-group flags of the range test's printed commands, as the train script parses
    them: the same whether the bounds are given as numbers or as the saved JSON (--lr-from)."""
    lines = printed.splitlines()
    numbers = shlex.split(lines[lines.index("Train with:") + 1])[2:]
    saved = shlex.split(next(line for line in lines if line.startswith("(or: "))[len("(or: "):-1])[2:]
    assert "--lr-from" in saved and "--lr-max" not in saved, "the JSON gives the bounds"
    numbers, saved = (parse_run_config(RECIPES[model], argv).training for argv in (numbers, saved))
    flags = ("bias_lr_scale", "decay_exempt", "weight_decay", "optimizer", "batch_size")
    assert [getattr(saved, f) for f in flags] == [getattr(numbers, f) for f in flags], "--lr-from trains the same way"
    return tuple(getattr(numbers, f) for f in flags)


@pytest.mark.slow
def test_range_test_sweeps_the_param_groups_the_run_will_train(data, tmp_path, capsys, monkeypatch):
    seen = swept_groups(monkeypatch)
    args = ["--model", "dilated", *common(data, tmp_path), "--batch-size", "50", "--num-iter", "4",
            "--weight-decay", "0.001", "--bias-lr-scale", "4", "--decay-exempt", "bias-norm-depthwise"]
    assert lr_range_test.main(args) == 0
    decayed = [(decay, scale) for decay, scale, _ in seen if decay > 0]
    assert decayed and all(decay == 0.001 and scale == 1.0 for decay, scale in decayed), \
        "only the full and pointwise convs and the FC weight keep the decay"
    assert any(decay == 0 and scale == 4 for decay, scale, _ in seen), "biases at 4x the LR, exempt from decay"
    assert trained_with(capsys.readouterr().out, "dilated")[:2] == (4.0, "bias-norm-depthwise")


@pytest.mark.slow
@pytest.mark.parametrize("model, flags, groups", [
    ("dilated", ["--decay-exempt", "none"], (1.0, "none", "sgd")),
    ("resnet", ["--optimizer", "adam", "--weight-decay", "0.001", "--decay-exempt", "bias-norm", "--bias-lr-scale", "2"],
     (2.0, "bias-norm", "adam")),
])
def test_the_printed_command_trains_the_groups_the_range_test_swept(data, tmp_path, capsys, monkeypatch, model, flags,
                                                                    groups):
    """A flag set back to the generic default (no exemption for the dilated net, whose script
    exempts by default) must still be spelled out, or the run trains other groups than the sweep."""
    seen = swept_groups(monkeypatch)
    args = ["--model", model, *common(data, tmp_path), "--batch-size", "50", "--num-iter", "4", *flags]
    assert lr_range_test.main(args) == 0
    scale, exempt, decay, optimizer, _ = trained_with(capsys.readouterr().out, model)
    assert (scale, exempt, optimizer) == groups
    assert {d for d, _, _ in seen} - {0} == {decay}, "the decay the sweep used"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet", "dilated"])
def test_range_test_left_to_its_defaults_splits_the_parameters_as_the_train_script_does(data, tmp_path, model,
                                                                                       monkeypatch):
    seen = swept_groups(monkeypatch)
    assert lr_range_test.main(["--model", model, *common(data, tmp_path), "--batch-size", "50", "--num-iter", "4"]) == 0
    train = parse_run_config(RECIPES[model], []).flags()
    exempt = sum(n for decay, _, n in seen if decay == 0)
    assert (exempt > 0) == (train["decay_exempt"] != "none"), "the sweep decays what the run decays"
    assert all(scale == train["bias_lr_scale"] or scale == 1.0 for _, scale, _ in seen)


def test_range_test_refuses_an_empty_sweep(capsys):
    assert lr_range_test.main(["--start-lr", "1", "--end-lr", "0.1"]) == 1
    assert "must be below --end-lr" in capsys.readouterr().err


def test_plot_schedules_draws_both_curves(tmp_path):
    assert lr_range_test.main(["--plot-schedules", "--out", str(tmp_path)]) == 0
    assert_drawn(tmp_path / "cyclic_lr.png")
    assert_drawn(tmp_path / "one_cycle.png")


@pytest.mark.slow
def test_lr_max_find_trains_with_the_suggestion(data, tmp_path):
    """On the smallest net: the ResNet's own sweep runs in the range test's tests above."""
    args = [*common(data, tmp_path), "--epochs", "1", "--batch-size", "50", "--lr-max", "find"]
    assert train_ultimus.main(args) == 0
    found, metrics = read(tmp_path / "lr_finder.json"), read(tmp_path / "metrics.json")
    assert metrics["lr_max"] == found["lr_max"] and metrics["lr_min"] == found["lr_min"]
    assert metrics["lr_source"].startswith("range test")


@pytest.mark.slow
def test_lr_from_reuses_a_saved_test(data, tmp_path):
    saved = tmp_path / "lr_finder.json"
    saved.write_text(json.dumps({"model": "resnet", "optimizer": "sgd", "lr_max": 0.02, "lr_min": 0.002}))
    args = [*common(data, tmp_path / "run"), "--epochs", "1", "--batch-size", "50", "--lr-from", str(saved)]
    assert train_resnet.main(args) == 0
    metrics = read(tmp_path / "run" / "metrics.json")
    assert (metrics["lr_max"], metrics["lr_min"]) == (0.02, 0.002)


def test_lr_from_a_file_that_is_not_a_range_test(data, tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert train_resnet.main([*common(data, tmp_path / "run"), "--batch-size", "50", "--lr-from", str(bad)]) == 1
    assert "is not an lr_finder.json" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_reports_the_spread_over_seeds(data, tmp_path, capsys):
    args = [*common(data, tmp_path), "--epochs", "1", "--batch-size", "50", "--runs", "2", "--seed", "3"]
    assert train_ultimus.main(args) == 0
    summary = read(tmp_path / "runs.json")
    assert summary["seeds"] == [3, 4] and len(summary["final_test_acc"]) == 2
    assert summary["mean"] == pytest.approx(np.mean(summary["final_test_acc"]))
    assert summary["std"] == pytest.approx(np.std(summary["final_test_acc"], ddof=1))
    assert read(tmp_path / "seed4" / "metrics.json")["flags"]["seed"] == 4
    assert "± " in capsys.readouterr().out


@pytest.mark.slow
def test_dilated_script_prints_the_receptive_field(data, tmp_path, capsys):
    assert train_dilated.main([*common(data, tmp_path), "--epochs", "1", "--batch-size", "50"]) == 0
    out = capsys.readouterr().out
    rf = int(out.split("Receptive field: ")[1].split()[0])
    assert rf > 44 and "nin" in out and "rout" in out
    assert (tmp_path / "receptive_field.txt").read_text().strip().endswith(f"Receptive field: {rf}")
    metrics = read(tmp_path / "metrics.json")
    assert metrics["params"] < 200_000 and metrics["flags"]["downsample"] == "strided"


@pytest.mark.slow
def test_ultimus_exact_and_residual_variants_train(data, tmp_path):
    assert train_ultimus.main([*common(data, tmp_path / "exact"), "--epochs", "1", "--batch-size", "50"]) == 0
    assert train_ultimus.main([*common(data, tmp_path / "res"), "--epochs", "1", "--batch-size", "50",
                               "--residual"]) == 0
    exact, residual = read(tmp_path / "exact" / "metrics.json"), read(tmp_path / "res" / "metrics.json")
    assert exact["params"] == residual["params"] == 25_786
    assert exact["flags"]["residual"] is False and residual["flags"]["residual"] is True
    assert exact["flags"]["optimizer"] == "adam"

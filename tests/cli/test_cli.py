"""train_resnet.py end to end on tiny synthetic data: outputs, exact resume, evaluation, refusals."""

import functools
import inspect
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dilated
import train_resnet
import train_ultimus
from core.cli.parsers import parse_run_config
from core.models import MODELS
from core.runs.checkpoint import load_checkpoint, save_checkpoint
from core.train import loop
from core.train.optim import OPTIMIZERS
from core.train.recipes import RECIPES
from tests.conftest import assert_drawn, ctrl_c_in_second_epoch, metrics, one_error_line, tiny_run, write_image_folder

ROOT = Path(__file__).resolve().parents[2]
# The spec's count is the model test's to check (tests/models/test_models.py); a run reports its own.
RESNET_PARAMS = sum(p.numel() for p in MODELS["resnet"]().parameters())


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(100, 20)  # few test images: evaluation, three times a run, costs as much as training


tiny = functools.partial(tiny_run, epochs=3, lr=(0.05, 0.005))


def training_figures(m):
    """Per epoch, what training alone decides: evaluation settings must leave these unchanged."""
    return [(h["train_loss"], h["train_acc"], h["lr"]) for h in m["history"]]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """The ResNet's tiny run, for what only the ResNet has (its flags, its parameter count)."""
    out = tmp_path_factory.mktemp("full")
    assert train_resnet.main(tiny(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def dilated_run(data, tmp_path_factory):
    """The same tiny run of the dilated net, a net with BatchNorm at a sixth of the ResNet's cost:
    what every recipe shares (evaluation, averaging, resume) is tested on it."""
    out = tmp_path_factory.mktemp("dilated")
    assert train_dilated.main(tiny(data, out)) == 0
    return out


def last_weight(state):
    return [key for key in state if key.endswith("weight")][-1]


@pytest.mark.slow
def test_a_run_writes_every_output(full_run, capfd):
    names = {p.name for p in full_run.iterdir()}
    assert {"metrics.json", "metrics.csv", "summary.txt", "last.pt", "best.pt", "curves.png",
            "lr_schedule.png", "misclassified.png"} <= names
    m = metrics(full_run)
    assert m["params"] == RESNET_PARAMS and len(m["history"]) == 3
    assert m["final_test_acc"] == m["history"][-1]["test_acc"]
    assert m["best_test_acc"] == max(h["test_acc"] for h in m["history"])
    assert m["train_images_per_s"] > 0 and m["lr_max"] == 0.05 and m["lr_min"] == 0.005
    assert set(m["timing"]) == {"data_load_s", "warmup_s", "train_s", "eval_s", "checkpoint_s", "total_s"}
    assert all(v > 0 for v in m["timing"].values())
    assert m["timing"]["total_s"] == pytest.approx(sum(v for k, v in m["timing"].items() if k != "total_s"))
    assert m["train_images_per_s"] == pytest.approx((3 * 100 - 50) / m["timing"]["train_s"])
    assert set(m["history"][0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                                    "epoch_time_s"}
    assert len((full_run / "metrics.csv").read_text().splitlines()) == 4
    assert f"Total params: {RESNET_PARAMS:,}" in (full_run / "summary.txt").read_text()
    ckpt = load_checkpoint(full_run / "last.pt", "resnet")
    assert ckpt["epoch"] == 3 and ckpt["args"]["lr_max"] == 0.05


@pytest.mark.slow
def test_tta_changes_the_evaluation_but_not_the_training(data, dilated_run, tmp_path):
    """The recipes turn TTA on by default; a run without it must train the very same weights,
    so one checkpoint evaluated both ways compares the two fairly."""
    full_run = dilated_run
    assert train_dilated.main(tiny(data, tmp_path, "--no-tta")) == 0
    with_tta, without = load_checkpoint(full_run / "last.pt", "dilated"), load_checkpoint(tmp_path / "last.pt", "dilated")
    assert with_tta["args"]["tta"] is True and without["args"]["tta"] is False
    flags_with, flags_without = metrics(full_run)["flags"], metrics(tmp_path)["flags"]
    assert (flags_with["tta"], flags_without["tta"], flags_without["tta_shift"]) == (True, False, 0)
    assert all(torch.equal(with_tta["model"][k], without["model"][k]) for k in with_tta["model"])
    assert training_figures(metrics(full_run)) == training_figures(metrics(tmp_path))


@pytest.mark.slow
def test_eval_every_skips_test_figures_between_evaluations_but_trains_the_same(data, dilated_run, tmp_path, capsys):
    assert train_dilated.main(tiny(data, tmp_path, "--eval-every", "2")) == 0
    assert capsys.readouterr().out.count("Test set:") == 2  # epoch 2, and the last
    m, m_every = metrics(tmp_path), metrics(dilated_run)
    every, sparse = m_every["history"], m["history"]
    assert training_figures(m) == training_figures(m_every)
    assert sparse[0]["test_acc"] is None and sparse[0]["test_loss"] is None
    assert [(h["test_loss"], h["test_acc"]) for h in sparse[1:]] == [(h["test_loss"], h["test_acc"]) for h in every[1:]]
    assert m["flags"]["eval_every"] == 2 and m_every["flags"]["eval_every"] == 1
    assert m["best_test_acc"] == max(h["test_acc"] for h in sparse[1:]) and m["final_test_acc"] == sparse[2]["test_acc"]
    assert load_checkpoint(tmp_path / "best.pt", "dilated")["epoch"] in (2, 3)
    first_row = (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")
    assert first_row[4:6] == ["", ""]
    assert_drawn(tmp_path / "curves.png")


@pytest.mark.slow
def test_log_has_the_seed_style_lines(data, tmp_path, capsys):
    assert train_dilated.main(tiny(data, tmp_path, "--epochs", "2")) == 0
    out = capsys.readouterr().out
    assert "EPOCH: 1 (LR: 0.005" in out and "EPOCH: 2 (LR: " in out
    assert out.count("Test set: Average loss: ") == 2 and "Accuracy: " in out and "/20 (" in out
    assert f"Total params: {metrics(tmp_path)['params']:,}" in out


def interrupt_then_resume(data, out, monkeypatch, *flags, script=train_resnet):
    """Ctrl-C during the second epoch, then --resume: the run must finish as if never stopped."""
    with ctrl_c_in_second_epoch(monkeypatch):
        assert script.main(tiny(data, out, *flags)) == 130
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert script.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0


def assert_same_run(resumed, straight):
    for key in ("test_acc", "test_loss", "train_loss", "lr"):
        assert [h[key] for h in metrics(resumed)["history"]] == [h[key] for h in metrics(straight)["history"]], key
    a = load_checkpoint(resumed / "last.pt")["model"]
    b = load_checkpoint(straight / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(data, dilated_run, tmp_path, monkeypatch):
    interrupt_then_resume(data, tmp_path, monkeypatch, script=train_dilated)
    assert_same_run(tmp_path, dilated_run)
    m = metrics(tmp_path)  # the command that repeats the run is the first one, not the resume
    assert m["command"] == shlex.join(["python", "train_dilated.py", *tiny(data, tmp_path)])
    assert m["resumed_with"] == [f"python train_dilated.py --resume {tmp_path / 'last.pt'} --no-progress"]
    assert metrics(dilated_run)["resumed_with"] == []


@pytest.mark.slow
def test_interrupted_run_with_two_param_groups_resumes_to_the_same_result(data, tmp_path, monkeypatch):
    """The bag-of-tricks flags add a second optimizer group (64x LR biases), a whitening basis and
    frozen BN scales; resuming must restore all of them from the checkpoint alone."""
    tricks = ("--whiten", "--ghost-batch", "10", "--freeze-bn-scale", "--bias-lr-scale", "64", "--celu-alpha", "0.3",
              "--epochs", "2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_resnet.main(tiny(data, straight, *tricks)) == 0
    interrupt_then_resume(data, resumed, monkeypatch, *tricks)
    groups = load_checkpoint(resumed / "last.pt")["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 64.0]
    assert_same_run(resumed, straight)


@pytest.mark.slow
def test_ema_and_alternating_flip_resume_exactly_and_evaluation_uses_the_average(data, tmp_path, monkeypatch, capsys):
    """The average is state of its own (in the checkpoint) and the flips depend on the epoch
    number: both must come back on --resume. The run reports the average's accuracy, so
    --eval-only of its checkpoint must too. Neither depends on the model: the small one trains."""
    flags = ("--ema-decay", "0.8", "--flip", "alternating")
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    assert train_ultimus.main(tiny(data, straight, *flags)) == 0
    interrupt_then_resume(data, resumed, monkeypatch, *flags, script=train_ultimus)
    assert_same_run(resumed, straight)
    a, b = load_checkpoint(resumed / "last.pt")["ema"], load_checkpoint(straight / "last.pt")["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    live = load_checkpoint(straight / "last.pt")["model"]
    assert not torch.equal(a["fc.weight"], live["fc.weight"])
    assert train_ultimus.main(tiny(data, plain, "--ema-decay", "0.8")) == 0
    assert metrics(straight)["history"][0]["train_loss"] != metrics(plain)["history"][0]["train_loss"], \
        "alternating flips train other batches"
    capsys.readouterr()
    assert train_ultimus.main(["--eval-only", "--resume", str(straight / "last.pt"), "--data", str(data),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["weights"] == "ema"
    final = metrics(straight)["history"][-1]
    assert (evaluated["test_acc"], evaluated["test_loss"]) == (final["test_acc"], pytest.approx(final["test_loss"]))


@pytest.mark.slow
def test_the_average_leaves_training_alone(data, dilated_run, tmp_path):
    """The average only reads the live weights, so runs that differ in --ema-decay alone train the
    same weights: one trajectory can be judged under several averages (docs/lab/results.md)."""
    out = tmp_path / "ema"
    assert train_dilated.main(tiny(data, out, "--ema-decay", "0.8")) == 0
    assert training_figures(metrics(out)) == training_figures(metrics(dilated_run))
    averaged, plain = load_checkpoint(out / "last.pt"), load_checkpoint(dilated_run / "last.pt")
    assert all(torch.equal(averaged["model"][k], plain["model"][k]) for k in plain["model"])
    key = last_weight(plain["model"])
    assert plain["ema"] is None and not torch.equal(averaged["ema"][key], plain["model"][key])


@pytest.mark.slow
def test_recalibrated_bn_leaves_training_alone_and_eval_only_reproduces_it(data, dilated_run, tmp_path, capsys):
    """Recalibration rewrites only BN running statistics, which training (in train mode) never
    reads, so the run trains exactly as without the flag; --eval-only with the flag, on the plain
    run's checkpoint, must then reproduce the flagged run's final evaluation."""
    out = tmp_path / "recal"
    assert train_dilated.main(tiny(data, out, "--recalibrate-bn", "60")) == 0
    m, m_plain = metrics(out), metrics(dilated_run)
    plain, recal = m_plain["history"], m["history"]
    assert training_figures(m) == training_figures(m_plain)
    assert [h["test_loss"] for h in recal] != [h["test_loss"] for h in plain]
    assert m["flags"]["recalibrate_bn"] == 60
    assert train_dilated.main(["--eval-only", "--resume", str(dilated_run / "last.pt"), "--data", str(data),
                               "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none",
                               "--recalibrate-bn", "60"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["recalibrate_bn"] == 60
    assert (evaluated["test_acc"], evaluated["test_loss"]) == (recal[-1]["test_acc"], pytest.approx(recal[-1]["test_loss"]))


@pytest.mark.slow
def test_eval_only_on_a_test_only_folder(full_run, tmp_path, capsys):
    """On the ResNet, whose tiny run has learnt enough for shifted views to change its logits."""
    test_only = write_image_folder(tmp_path / "test_only", n_train=0, n_test=100)
    args = ["--eval-only", "--resume", str(full_run / "best.pt"), "--data", str(test_only),
            "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none"]
    assert train_resnet.main(args) == 0
    assert "Test set: Average loss: " in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["total"] == 100 and result["test_acc"] == 100 * result["correct"] / 100 and result["test_loss"] > 0
    assert sum(map(sum, result["confusion"])) == 100 and sum(row[i] for i, row in enumerate(result["confusion"])) \
        == result["correct"]
    assert train_resnet.main([*args, "--tta-shift", "2"]) == 1, "not over the first evaluation"
    assert "--overwrite" in capsys.readouterr().err
    assert train_resnet.main([*args, "--tta-shift", "2", "--overwrite"]) == 0
    shifted = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (shifted["tta"], shifted["tta_shift"], result["tta_shift"]) == (True, 2, 0)
    assert shifted["test_loss"] != result["test_loss"]  # the shifted views took part
    capsys.readouterr()
    assert train_resnet.main([*args, "--recalibrate-bn", "50", "--overwrite"]) == 1
    assert "--recalibrate-bn needs training images" in one_error_line(capsys)


@pytest.mark.slow
def test_a_loss_that_turns_nan_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    """Where the loss first overflows depends on the CPU's kernels: the checkpoint left must hold
    the last epoch that ended with a finite loss, and every epoch recorded must have ended so."""
    code = train_resnet.main(tiny(data, tmp_path, "--lr-max", "1e12", "--lr-min", "1e11", "--amp", "off"))
    assert code == 1
    assert "loss became" in one_error_line(capsys)
    finished = metrics(tmp_path)["history"] if (tmp_path / "metrics.json").exists() else []
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == len(finished) < 3
    assert all(math.isfinite(h["train_loss"]) for h in finished)


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--batch-size", "-4"], ["--lr-max", "-0.1"], ["--lr-max", "0"]])
def test_non_positive_numbers_are_refused_by_the_parser(data, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        train_resnet.main(tiny(data, tmp_path / "out", *flags))
    assert exit_info.value.code == 2
    assert "must be positive" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--tta-shift", "9"], ["--cutout-size", "33"], ["--cutout-size", "-1"],
                                   ["--ghost-batch", "-1"], ["--ghost-batch", "8.5"],
                                   ["--celu-alpha", "-0.3"], ["--bias-lr-scale", "0"], ["--logit-scale", "0"],
                                   ["--eval-every", "-1"]])
def test_out_of_range_model_and_evaluation_flags_are_refused(data, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        train_resnet.main(tiny(data, tmp_path / "out", *flags))
    assert exit_info.value.code == 2
    assert flags[0] in one_error_line(capsys)


@pytest.mark.slow
def test_cutout_size_reaches_the_training_batches(data, full_run, tmp_path):
    """The default run trains with the spec's 8x8 square; another size trains other weights, and
    the run records which it used."""
    assert train_resnet.main(tiny(data, tmp_path / "none", "--cutout-size", "0")) == 0
    default, none = (metrics(p)["history"] for p in (full_run, tmp_path / "none"))
    assert [h["train_loss"] for h in none] != [h["train_loss"] for h in default]
    assert metrics(full_run)["flags"]["cutout_size"] == 8 and metrics(tmp_path / "none")["flags"]["cutout_size"] == 0
    assert load_checkpoint(tmp_path / "none" / "last.pt", "resnet")["args"]["cutout_size"] == 0


@pytest.mark.slow
def test_ghost_batch_trains_another_model_and_evaluation_loads_checkpoints_without_the_flag(
        data, full_run, tmp_path, capsys):
    """--ghost-batch changes training only; a checkpoint written before the flag existed has no
    ghost_batch in its args and must still evaluate (as the plain-BN model it is)."""
    assert train_resnet.main(tiny(data, tmp_path / "ghost", "--ghost-batch", "16")) == 0
    ghost = load_checkpoint(tmp_path / "ghost" / "last.pt", "resnet")
    assert ghost["args"]["ghost_batch"] == 16 and metrics(tmp_path / "ghost")["flags"]["ghost_batch"] == 16
    straight = metrics(full_run)["history"][0]
    assert metrics(tmp_path / "ghost")["history"][0]["train_loss"] != straight["train_loss"]
    old = load_checkpoint(full_run / "best.pt", "resnet")
    del old["args"]["ghost_batch"]
    save_checkpoint(tmp_path / "old.pt", old)
    capsys.readouterr()
    assert train_resnet.main(["--eval-only", "--resume", str(tmp_path / "old.pt"), "--data", str(data),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none"]) == 0
    assert "Test set: Average loss: " in capsys.readouterr().out


@pytest.mark.slow
def test_whiten_fits_the_basis_to_the_data_and_evaluation_restores_it(data, full_run, tmp_path, capsys):
    """Evaluation builds the model without training data, so only the saved basis can give back
    the accuracy the run measured."""
    out = tmp_path / "whiten"
    assert train_resnet.main(tiny(data, out, "--whiten")) == 0
    ckpt = load_checkpoint(out / "best.pt", "resnet")
    assert ckpt["args"]["whiten"] is True and metrics(out)["flags"]["whiten"] is True
    assert not torch.equal(ckpt["model"]["prep.0.basis"], torch.eye(27))
    assert metrics(out)["history"][0]["train_loss"] != metrics(full_run)["history"][0]["train_loss"]
    capsys.readouterr()
    assert train_resnet.main(["--eval-only", "--resume", str(out / "best.pt"), "--data", str(data),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["test_acc"] == metrics(out)["best_test_acc"]


@pytest.mark.slow
def test_logit_scale_trains_another_model_and_evaluation_rebuilds_it(data, full_run, tmp_path, capsys):
    """The scale has no parameter, so only the flags saved in the checkpoint can give evaluation
    back the logits, and so the test loss, that the run measured."""
    out = tmp_path / "scaled"
    assert train_resnet.main(tiny(data, out, "--logit-scale", "0.5")) == 0
    assert load_checkpoint(out / "last.pt", "resnet")["args"]["logit_scale"] == 0.5
    assert metrics(out)["flags"]["logit_scale"] == 0.5
    assert metrics(out)["history"][0]["train_loss"] != metrics(full_run)["history"][0]["train_loss"]
    capsys.readouterr()
    assert train_resnet.main(["--eval-only", "--resume", str(out / "last.pt"), "--data", str(data),
                              "--out", str(tmp_path / "eval"), "--device", "cpu", "--cache-dir", "none"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["test_loss"] == pytest.approx(metrics(out)["history"][-1]["test_loss"], rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--max-at-epoch", "5"], "--max-at-epoch 5.0 must lie strictly between 0 and --epochs 3"),
    (["--lr-min", "0.5"], "must be below --lr-max"),
    (["--batch-size", "5000"], "exceeds the 100 training images"),
    (["--ema-decay", "1"], "--ema-decay 1.0 must lie in [0, 1)"),
])
def test_inconsistent_flags_give_one_line(data, tmp_path, capsys, flags, message):
    assert train_resnet.main(tiny(data, tmp_path / "out", *flags)) == 1
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.pt", "does not exist"),
    (lambda d: (d / "junk.pt").write_bytes(b"not a checkpoint") and d / "junk.pt", "is not a readable checkpoint"),
    (lambda d: torch.save({"weights": torch.zeros(2)}, d / "plain.pt") or d / "plain.pt", "not a checkpoint of this toolkit"),
    (lambda d: save_checkpoint(d / "other.pt", {"model_name": "dilated"}) or d / "other.pt", "holds a 'dilated' model"),
])
def test_bad_resume_paths(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert train_resnet.main(["--resume", str(path), "--device", "cpu"]) == 1
    assert message in one_error_line(capsys)


def cuda_trained(ckpt):
    ckpt["rng"]["aug_device"] = "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    (cuda_trained, "was trained on cuda and this run is on cpu: an exact resume needs the same kind of device, "
                   "so resume with --device cuda"),
])
def test_resuming_on_another_kind_of_device_is_refused(full_run, tmp_path, capsys, edit, message):
    """The augmentation generator lives on the training device and cannot move to another kind."""
    ckpt = load_checkpoint(full_run / "last.pt")
    edit(ckpt)
    save_checkpoint(tmp_path / "last.pt", ckpt)
    assert train_resnet.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--no-progress"]) == 1
    assert message in one_error_line(capsys)


@pytest.mark.slow
def test_a_run_without_fp16_resumes_under_fp16_loss_scaling(data, tmp_path, monkeypatch):
    """A run started on an A100 (bf16, so no loss scale saved) and resumed on a T4 (fp16, with a
    GradScaler) must go on with a new loss scale rather than fail to load the empty one."""
    interrupted = tmp_path / "run"
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train_dilated.main(tiny(data, interrupted)) == 130
    assert load_checkpoint(interrupted / "last.pt")["scaler"] == {}
    monkeypatch.undo()
    monkeypatch.setattr(loop, "make_scaler", lambda *a: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert train_dilated.main(["--resume", str(interrupted / "last.pt"), "--no-progress"]) == 0
    assert load_checkpoint(interrupted / "last.pt")["scaler"]["scale"] > 0
    assert metrics(interrupted)["history"][-1]["epoch"] == 3


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "is empty"),
])
def test_bad_data_paths(tmp_path, capsys, make, message):
    args = ["--data", str(make(tmp_path)), "--out", str(tmp_path / "out"), "--device", "cpu", "--cache-dir", "none"]
    assert train_resnet.main(args) == 1
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_default_data_without_internet(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    assert train_resnet.main(["--device", "cpu", "--cache-dir", "none", "--out", "out"]) == 1
    assert "pass --data PATH to a local copy" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # no ./data left behind, and no output folder


@pytest.mark.slow
def test_real_process_exits_non_zero_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train_resnet.py", "--data", str(tmp_path / "missing"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: data path") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_each_optimizer_has_its_own_default_weight_decay_unless_one_is_given():
    """SGD's decay means other things to Adam (L2, divided by each weight's gradient scale) and
    AdamW (decoupled, multiplied by the LR), so each has a default of its own in every recipe."""
    for recipe in RECIPES.values():
        assert set(recipe.weight_decay) == set(OPTIMIZERS)
        for optimizer in OPTIMIZERS:
            chosen = parse_run_config(recipe, ["--optimizer", optimizer]).training
            assert recipe.weight_decay_for(chosen) == recipe.weight_decay[optimizer]
            given = parse_run_config(recipe, ["--optimizer", optimizer, "--weight-decay", "0.003"]).training
            assert recipe.weight_decay_for(given) == 0.003
    resnet = RECIPES["resnet"].weight_decay
    assert resnet["adam"] != resnet["sgd"] != resnet["adamw"]


@pytest.mark.slow
def test_a_run_trains_with_its_optimizers_weight_decay_and_records_it(data, tmp_path):
    out = tmp_path / "adamw"
    assert train_resnet.main(tiny(data, out, "--optimizer", "adamw", "--epochs", "2")) == 0
    expected = RECIPES["resnet"].weight_decay["adamw"]
    assert load_checkpoint(out / "last.pt", "resnet")["optimizer"]["param_groups"][0]["weight_decay"] == expected
    assert metrics(out)["weight_decay"] == expected


@pytest.mark.slow
def test_frozen_bn_scales_and_bias_lr_scale(data, full_run, tmp_path):
    """The BN scales stay exactly 1 through training, and the bias group trains at 64x the
    weights' LR with weight decay / 64."""
    out = tmp_path / "tricks"
    assert train_resnet.main(tiny(data, out, "--freeze-bn-scale", "--bias-lr-scale", "64")) == 0
    ckpt = load_checkpoint(out / "last.pt", "resnet")
    scales = [v for k, v in ckpt["model"].items() if k.endswith(".weight") and v.ndim == 1]
    assert len(scales) == 8 and all(torch.equal(s, torch.ones_like(s)) for s in scales)
    weights, biases = ckpt["optimizer"]["param_groups"]
    assert biases["lr"] == pytest.approx(64 * weights["lr"])
    assert biases["weight_decay"] == pytest.approx(weights["weight_decay"] / 64)
    assert "Non-trainable params: 2,240" in (out / "summary.txt").read_text()
    assert metrics(out)["history"][0]["train_loss"] != metrics(full_run)["history"][0]["train_loss"]


@pytest.mark.parametrize("recipe_name,name", [(r, p) for r in sorted(RECIPES) for p in sorted(RECIPES[r].presets)])
def test_preset_sets_its_flags_and_leaves_the_rest(recipe_name, name):
    recipe = RECIPES[recipe_name]
    preset = recipe.presets[name]
    plain = parse_run_config(recipe, []).flags()
    assert all(dest in plain and plain[dest] != value for dest, value in preset.items()), "a preset must change real flags"
    chosen = parse_run_config(recipe, ["--preset", name]).flags()
    assert {dest: chosen[dest] for dest in preset} == preset
    assert {k: v for k, v in chosen.items() if k not in preset and k != "preset"} == \
        {k: v for k, v in plain.items() if k not in preset and k != "preset"}


def test_explicit_flags_win_over_a_preset():
    for name in ("tricks", "best"):
        mixed = parse_run_config(RECIPES["resnet"], ["--ghost-batch", "16", "--preset", name, "--celu-alpha", "0"])
        assert dict(mixed.model) == {**mixed.model, "ghost_batch": 16, "celu_alpha": 0.0, "whiten": True}
        assert mixed.training.bias_lr_scale == 64.0
    mixed = parse_run_config(RECIPES["ultimus"], ["--preset", "residual", "--lr-max", "0.01"])
    assert (mixed.model["residual"], mixed.model["init"]) == (True, "kaiming")
    assert (mixed.training.lr_max, mixed.training.lr_min) == (0.01, 0.002)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_model_and_augment_flag_defaults_are_the_constructor_defaults(name):
    # A checkpoint older than a flag lacks it, and evaluation or --resume then leaves that keyword to
    # the constructor: if the two defaults differed, it would rebuild another model than it trained.
    recipe = RECIPES[name]
    config = parse_run_config(recipe, [])
    for build, kwargs in ((MODELS[name], config.model), (recipe.augment, config.augment)):
        params = inspect.signature(build).parameters
        assert dict(kwargs) == {key: params[key].default for key in kwargs}, build.__name__
    assert config.model.keys() == {flag.lstrip("-").replace("-", "_") for flag, _ in recipe.model_flags}


def test_unknown_preset_is_refused(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_resnet.main(tiny(data, tmp_path / "out", "--preset", "fast"))
    assert exit_info.value.code == 2 and "--preset" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()

"""A run never loses or overwrites a user's work: where it writes, what a resume may change,
folders it cannot write, two runs at once, temp files of killed writes, any number of classes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lr_range_test
import train_resnet
import train_ultimus
from core.errors import UserError
from core.runs import outputs
from core.runs.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import ctrl_c_in_second_epoch, metrics, one_error_line, tiny_run, write_image_folder

ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 2-epoch run, left alone by the tests (they copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_ultimus.main(tiny_run(data, out)) == 0
    return out


@pytest.mark.slow
def test_a_moved_run_resumes_in_its_new_folder_and_never_recreates_the_old_one(data, tmp_path, monkeypatch):
    """Started with --out A and moved to B: the checkpoint still records A, but B is where it is."""
    a, b = tmp_path / "A", tmp_path / "B"
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny_run(data, a, epochs=3)) == 130
    a.rename(b)
    assert load_checkpoint(b / "last.pt")["args"]["out"] == str(a)
    assert train_ultimus.main(["--resume", str(b / "last.pt"), "--epochs", "3", "--no-progress"]) == 0
    assert not a.exists(), "the folder the run was started in is not recreated"
    assert metrics(b)["history"][-1]["epoch"] == 3


@pytest.mark.slow
def test_a_new_run_into_a_folder_holding_a_run_is_refused_unless_told(data, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = (out / "last.pt").read_bytes()
    assert train_ultimus.main(tiny_run(data, out)) == 1
    line = one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "last.pt").read_bytes() == before
    (out / "eval.json").write_text("{}")  # what the replaced run left that this one would not rewrite
    assert train_ultimus.main(tiny_run(data, out, "--overwrite", "--seed", "1")) == 0
    assert "--overwrite: replacing the run in" in capsys.readouterr().out
    assert not (out / "eval.json").exists() and metrics(out)["flags"]["seed"] == 1


@pytest.mark.slow
def test_a_resume_refuses_training_flags_that_differ_and_takes_those_that_agree(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = (out / "last.pt").read_bytes()
    assert train_ultimus.main(["--resume", str(out / "last.pt"), "--epochs", "6", "--lr-max", "0.1"]) == 1
    line = one_error_line(capsys)
    assert "--epochs 6 (the run has --epochs 2)" in line and "--lr-max 0.1" in line and "one-cycle" in line
    assert (out / "last.pt").read_bytes() == before
    assert train_ultimus.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress",
                               "--device", "cpu"]) == 0


@pytest.mark.slow
def test_resuming_an_older_checkpoint_into_its_folder_is_refused(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny_run(data, out, epochs=3)) == 130
    shutil.copy(out / "last.pt", out / "older.pt")  # as best.pt is, once last.pt has moved on
    assert train_ultimus.main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    capsys.readouterr()
    assert train_ultimus.main(["--resume", str(out / "older.pt"), "--no-progress"]) == 1
    assert "older.pt holds epoch 1 but" in one_error_line(capsys)
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    branch = tmp_path / "branch"
    assert train_ultimus.main(["--resume", str(out / "older.pt"), "--out", str(branch), "--no-progress"]) == 0
    same = ("epoch", "lr", "train_loss", "test_loss")  # the branch retrains epochs 2-3 exactly
    assert [[h[k] for k in same] for h in metrics(branch)["history"]] == \
        [[h[k] for k in same] for h in metrics(out)["history"]]
    assert load_checkpoint(branch / "last.pt")["epoch"] == 3


@pytest.mark.slow
def test_a_second_run_into_a_folder_another_live_run_holds_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / outputs.LOCK_NAME).write_text(str(holder.pid))
        assert train_ultimus.main(tiny_run(data, out)) == 1
        assert f"another run (process {holder.pid}) is writing into" in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert train_ultimus.main(tiny_run(data, out)) == 0, "a dead holder's lock is taken over"
    assert not (out / outputs.LOCK_NAME).exists()


@pytest.mark.slow
def test_temp_files_of_dead_writers_are_removed_and_a_failed_write_leaves_none(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [out / f"last.pt.tmp{dead.stdout.strip()}", out / f"curves.png.tmp{dead.stdout.strip()}.png"]
    for path in leftovers:
        path.write_bytes(b"half")
    assert train_ultimus.main(tiny_run(data, out)) == 0
    assert not any(p.exists() for p in leftovers)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        outputs.write_json(out / "x.json", {"a": 1})
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("below, expected", [((), "is a file, not a folder"), (("sub",), "which is a file")])
def test_an_out_that_cannot_be_a_folder_gets_one_line(data, tmp_path, capsys, below, expected):
    (tmp_path / "file").write_text("x")
    out = tmp_path.joinpath("file", *below)
    assert train_ultimus.main(tiny_run(data, out)) == 1
    assert expected in one_error_line(capsys)
    assert lr_range_test.main(["--data", str(data), "--out", str(out), "--device", "cpu", "--cache-dir", "none"]) == 1
    assert expected in one_error_line(capsys)
    assert train_ultimus.main(["--data", str(data), "--cache-dir", str(tmp_path / "file"), "--out",
                               str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert "--cache-dir" in one_error_line(capsys)


def test_a_read_only_out_gets_one_line(data, tmp_path, capsys, monkeypatch):
    """Root writes anywhere, so the read-only file system is imitated where the check probes it."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", read_only)
    assert train_ultimus.main(tiny_run(data, tmp_path / "out")) == 1
    assert "Read-only file system" in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("classes", [2, 11])
def test_any_number_of_classes_trains_and_writes_every_output(tmp_path, classes):
    names = [f"class{c:02d}" for c in range(classes)]
    root = write_image_folder(tmp_path / "imgs", n_train=10 * classes, n_test=5 * classes, classes=names,
                              num_labels=classes)
    out = tmp_path / "run"
    assert train_ultimus.main(["--data", str(root), "--out", str(out), "--epochs", "1", "--batch-size", "10",
                               "--device", "cpu", "--cache-dir", "none", "--no-progress"]) == 0
    assert {"metrics.json", "last.pt", "best.pt", "curves.png", "misclassified.png"} <= set(os.listdir(out))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["classes"] == names and ckpt["model"]["fc.weight"].shape[0] == classes
    other = write_image_folder(tmp_path / "other", n_train=0, n_test=20, classes=names[:2], num_labels=2)
    if classes != 2:
        assert train_ultimus.main(["--eval-only", "--resume", str(out / "last.pt"), "--data", str(other),
                                   "--cache-dir", "none", "--device", "cpu"]) == 1


@pytest.mark.slow
def test_the_resnet_trains_two_classes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_train=40, n_test=20, classes=["cat", "dog"], num_labels=2)
    assert train_resnet.main(["--data", str(root), "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "20",
                              "--device", "cpu", "--cache-dir", "none", "--no-progress"]) == 0


@pytest.mark.slow
def test_eval_only_without_data_reads_the_checkpoints_data(finished, tmp_path, capsys):
    assert train_ultimus.main(["--eval-only", "--resume", str(finished / "last.pt"), "--out", str(tmp_path),
                               "--device", "cpu", "--cache-dir", "none"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test_acc"] == metrics(finished)["final_test_acc"]


@pytest.mark.slow
def test_a_checkpoint_missing_a_key_gets_one_line(finished, tmp_path, capsys):
    ckpt = load_checkpoint(finished / "last.pt")
    del ckpt["args"]
    save_checkpoint(tmp_path / "broken.pt", ckpt)
    for extra in ([], ["--eval-only"]):
        assert train_ultimus.main(["--resume", str(tmp_path / "broken.pt"), "--device", "cpu", *extra]) == 1
        assert "lacks args" in one_error_line(capsys)


def test_ctrl_c_names_the_lost_epoch_and_a_resume_command_a_shell_can_paste(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a run with spaces"
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny_run(data, out)) == 130
    err = capsys.readouterr().err
    assert "after epoch 1 (training since then is lost)" in err
    assert f"python train_ultimus.py --resume '{out / 'last.pt'}'" in err


@pytest.mark.parametrize("flags, message", [
    (["--label-smoothing", "2"], "must be below 1"), (["--label-smoothing", "nan"], "not a finite number"),
    (["--weight-decay", "nan"], "not a finite number"), (["--seed", "99999999999999999999"], "must lie in 0.."),
    (["--seed", "-1"], "must lie in 0.."),
])
def test_bad_numbers_get_one_argparse_line(data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_ultimus.main(tiny_run(data, tmp_path / "out", *flags))
    assert exit_info.value.code == 2 and message in one_error_line(capsys)


def test_the_dilated_width_and_the_sweep_length_are_checked(capsys):
    import train_dilated

    for main, flags in ((train_dilated.main, ["--width", "0"]), (train_dilated.main, ["--width", "-8"]),
                        (lr_range_test.main, ["--num-iter", "1"])):
        with pytest.raises(SystemExit) as exit_info:
            main(flags)
        assert exit_info.value.code == 2 and "must be" in one_error_line(capsys)


@pytest.mark.slow
def test_the_range_test_prints_a_train_command_with_what_changed_its_reading(data, tmp_path, capsys):
    assert lr_range_test.main(["--data", str(data), "--out", str(tmp_path), "--device", "cpu", "--cache-dir", "none",
                               "--model", "ultimus", "--batch-size", "50", "--weight-decay", "1e-4",
                               "--num-iter", "10"]) == 0
    command = capsys.readouterr().out.split("Train with:\n  ")[1].splitlines()[0]
    for part in ("--batch-size 50", "--weight-decay 0.0001", "--optimizer adam", f"--data {data}"):
        assert part in command


@pytest.mark.slow
def test_a_sweep_that_finds_nothing_advises_the_train_scripts_own_flags(data, tmp_path, capsys, monkeypatch):
    from core.train import lr_bounds

    def no_lr(*args, **kwargs):
        raise ValueError("the loss never went down during the sweep")

    monkeypatch.setattr(lr_bounds, "suggest_bounds", no_lr)
    assert train_ultimus.main(tiny_run(data, tmp_path, "--lr-max", "find")) == 1
    line = one_error_line(capsys)
    assert "--lr-from" in line and "--num-iter" not in line


@pytest.mark.slow
def test_torch_saves_nothing_half_written_on_a_failed_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny_run(data, out)) == 0
    before = (out / "last.pt").read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UserError):
        save_checkpoint(out / "last.pt", {"x": torch.zeros(1)})
    assert (out / "last.pt").read_bytes() == before and not [p for p in out.iterdir() if ".tmp" in p.name]

"""What a user can get wrong, and what must then hold: no command replaces another run's files
without --overwrite, contradictory or foreign inputs and sizes that cannot be built are refused
in one line, and long work shows progress."""

import functools
import hashlib
import json
import shutil

import pytest

import lr_range_test
import predict
import train_dilated
import train_ultimus
from core.data.dataset import load_dataset
from core.errors import UserError
from core.train import setup
from core.train.lr_finder import lr_schedule
from tests.conftest import one_error_line, tiny_run, write_image_folder

tiny = functools.partial(tiny_run, epochs=1)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_ultimus.main(tiny(data, out)) == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, for a test to point commands at."""
    return shutil.copytree(finished, tmp_path / "run")


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_eval_only_writes_beside_the_run_and_leaves_every_file_of_it_alone(run, data, capsys):
    before = digests(run)
    assert train_ultimus.main(["--eval-only", "--resume", str(run / "best.pt"), "--data", str(data), "--device", "cpu",
                               "--cache-dir", "none", "--no-progress"]) == 0
    assert digests(run) == before
    evals = [p for p in run.iterdir() if p.is_dir()]
    assert len(evals) == 1 and evals[0].name.startswith("eval-")
    assert {"eval.json", "confusion.png", "misclassified.png"} <= {p.name for p in evals[0].iterdir()}
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(evals[0]))


@pytest.mark.slow
def test_eval_only_into_a_folder_that_is_not_empty_is_refused_unless_told(run, finished, data, tmp_path, capsys):
    other = shutil.copytree(finished, tmp_path / "other")
    before = digests(other)
    args = ["--eval-only", "--resume", str(run / "best.pt"), "--data", str(data), "--out", str(other), "--device",
            "cpu", "--cache-dir", "none", "--no-progress"]
    assert train_ultimus.main(args) == 1
    line = one_error_line(capsys)
    assert "is not empty" in line and "--overwrite" in line
    assert digests(other) == before
    assert train_ultimus.main([*args, "--overwrite"]) == 0
    assert json.loads((other / "eval.json").read_text())["checkpoint"] == str(run / "best.pt")


@pytest.mark.slow
def test_the_range_test_refuses_a_folder_holding_a_run_or_a_range_test(run, data, capsys):
    before = digests(run)
    sweep = ["--model", "ultimus", "--data", str(data), "--cache-dir", "none", "--device", "cpu", "--batch-size", "50",
             "--num-iter", "5", "--no-progress", "--out", str(run)]
    assert lr_range_test.main(sweep) == 1
    line = one_error_line(capsys)
    assert "already holds a run or a range test" in line and "--overwrite" in line
    assert digests(run) == before
    assert lr_range_test.main([*sweep, "--overwrite"]) == 0
    assert (run / "lr_finder.json").exists() and (run / "last.pt").read_bytes() == (run / "best.pt").read_bytes()
    assert lr_range_test.main(sweep) == 1, "its own range test is refused too"
    assert "lr_finder.json" in one_error_line(capsys)


@pytest.mark.slow
def test_drawing_the_schedules_into_a_folder_that_is_not_empty_is_refused(run, capsys):
    before = digests(run)
    assert lr_range_test.main(["--plot-schedules", "--out", str(run)]) == 1
    assert "--overwrite" in one_error_line(capsys)
    assert digests(run) == before


def test_more_runs_into_a_folder_holding_a_runs_summary_are_refused(data, tmp_path, capsys):
    base = tmp_path / "runs"
    base.mkdir()
    (base / "runs.json").write_text('{"runs": 2}')
    assert train_ultimus.main(tiny(data, base, "--runs", "2", "--seed", "7")) == 1
    assert "runs.json" in one_error_line(capsys)
    assert (base / "runs.json").read_text() == '{"runs": 2}' and [p.name for p in base.iterdir()] == ["runs.json"]


@pytest.mark.slow
def test_predict_refuses_to_replace_grad_cam_images_unless_told(finished, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    cams = tmp_path / "cams"
    command = ["--checkpoint", str(finished / "best.pt"), str(image), "--gradcam", str(cams), "--device", "cpu"]
    assert predict.main(command) == 0
    drawn = next(cams.iterdir())
    drawn.write_bytes(b"the user's own")
    capsys.readouterr()
    assert predict.main(command) == 1
    assert "--overwrite" in one_error_line(capsys) and drawn.read_bytes() == b"the user's own"
    assert predict.main([*command, "--overwrite"]) == 0 and drawn.read_bytes() != b"the user's own"


@pytest.mark.slow
@pytest.mark.parametrize("extra, named", [
    (["--lr-from", "J", "--lr-max", "0.1"], "drop --lr-max"),
    (["--lr-from", "J", "--lr-min", "0.001"], "drop --lr-min"),
    (["--lr-max", "find", "--lr-min", "0.001"], "--lr-max find reads --lr-min"),
    (["--num-iter", "20"], "add --lr-max find"),
])
def test_flags_that_one_would_silently_override_are_refused(data, tmp_path, capsys, extra, named):
    sweep = tmp_path / "sweep"
    assert lr_range_test.main(["--model", "ultimus", "--data", str(data), "--cache-dir", "none", "--device", "cpu",
                               "--batch-size", "50", "--num-iter", "5", "--no-progress", "--out", str(sweep)]) == 0
    capsys.readouterr()
    extra = [str(sweep / "lr_finder.json") if a == "J" else a for a in extra]
    assert train_ultimus.main(tiny(data, tmp_path / "run", *extra)) == 1
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_range_test_of_another_model_or_optimizer_is_refused(data, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert lr_range_test.main(["--model", "ultimus", "--data", str(data), "--cache-dir", "none", "--device", "cpu",
                               "--batch-size", "50", "--num-iter", "5", "--no-progress", "--out", str(sweep)]) == 0
    capsys.readouterr()
    bounds = str(sweep / "lr_finder.json")
    assert train_dilated.main(tiny(data, tmp_path / "a", "--lr-from", bounds)) == 1
    assert "swept the 'ultimus' model, but this script trains 'dilated'" in one_error_line(capsys)
    assert train_ultimus.main(tiny(data, tmp_path / "b", "--lr-from", bounds, "--optimizer", "sgd")) == 1
    assert "swept with --optimizer adam" in one_error_line(capsys)
    assert train_ultimus.main(tiny(data, tmp_path / "c", "--lr-from", bounds)) == 0


def test_a_dataset_of_fewer_than_two_classes_is_refused(tmp_path, capsys):
    root = write_image_folder(tmp_path / "one", n_train=20, n_test=10, classes=["cat"], num_labels=2)
    with pytest.raises(UserError, match="holds 1 class"):
        load_dataset(root, cache_dir=None)
    assert train_ultimus.main(tiny(root, tmp_path / "run", "--batch-size", "5")) == 1
    assert "at least two" in one_error_line(capsys) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("width, named", [("100000", "needs at least"), ("99999999999999999999", "cannot be built")])
def test_a_model_too_large_to_build_or_train_is_refused_before_any_allocation(data, tmp_path, capsys, width, named):
    assert train_dilated.main(tiny(data, tmp_path / "run", "--width", width)) == 1
    line = one_error_line(capsys)
    assert named in line and f"--width {width}" in line and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_batch_whose_activations_cannot_fit_is_refused_before_training(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(setup, "device_memory", lambda device: 2**30)
    assert train_ultimus.main(tiny(data, tmp_path / "ok", "--batch-size", "50")) == 0
    capsys.readouterr()
    monkeypatch.setattr(setup, "device_memory", lambda device: 2**20)
    assert train_ultimus.main(tiny(data, tmp_path / "run", "--batch-size", "50")) == 1
    assert "--batch-size 50 needs at least" in one_error_line(capsys) and not (tmp_path / "run").exists()


def test_learning_rates_beyond_float32_are_refused_and_an_extreme_sweep_stays_finite(capsys):
    with pytest.raises(SystemExit) as exit_:
        lr_range_test.main(["--mode", "linear", "--start-lr", "1e-300", "--end-lr", "1e300"])
    assert exit_.value.code == 2 and "the largest LR" in one_error_line(capsys)
    lrs = lr_schedule(1e-300, 3e38, 50, "exp")
    assert all(0 < lr < float("inf") for lr in lrs) and lrs[-1] == 3e38


@pytest.mark.slow
def test_lr_max_find_sweeps_num_iter_steps_and_shows_them(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, "--lr-max", "find", "--num-iter", "20")) == 0
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if "range test step" in line]
    swept = json.loads((out / "lr_finder.json").read_text())["lrs"]
    assert swept == lr_schedule(1e-5, 10.0, 20)[:len(swept)], "a sweep of 20 steps, stopped early if it diverged"
    shown = [f"{n}/20" for n in (10, 20) if n < len(swept)] + [f"{len(swept)}/20"]
    assert [line.split(":")[1].split(",")[0].strip() for line in steps] == shown
    assert "LR " in steps[0] and "smoothed loss" in steps[0]

"""Whatever file a user passes where a checkpoint belongs gets one line, never a traceback, and a
checkpoint's normalization is checked before any image is normalized with it."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from core.errors import UserError
from core.report import plots
from core.runs.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from core.runs.outputs import write_history_csv, write_json
from tests.conftest import one_error_line, synthetic_images


def _history():
    return [{"epoch": e, "lr": 0.1, "train_loss": 2.0 / e, "train_acc": 30.0 * e, "val_loss": None, "val_acc": None,
             "test_loss": 2.1 / e, "test_acc": 25.0 * e, "epoch_time_s": 1.0} for e in (1, 2)]


def test_random_bytes_text_and_a_runs_other_files_are_refused_in_one_line(tmp_path):
    rng = random.Random(0)
    files = []
    for i in range(300):
        head = rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"PK\x05\x06"])
        path = tmp_path / f"random{i}.pt"
        path.write_bytes(head + rng.randbytes(rng.randrange(0, 400)))
        files.append(path)
    (tmp_path / "notes.txt").write_text("these are not the weights you are looking for\n" * 20)
    write_history_csv(tmp_path / "metrics.csv", _history())
    write_json(tmp_path / "metrics.json", {"history": _history(), "final_test_acc": 50.0})
    plots.plot_curves(_history(), tmp_path / "curves.png")
    files += [tmp_path / name for name in ("notes.txt", "metrics.csv", "metrics.json", "curves.png")]
    for path in files:
        with pytest.raises(UserError, match="is not a (readable checkpoint|checkpoint of this toolkit)"):
            load_checkpoint(path, purpose="resume")


def test_a_damaged_checkpoint_loads_or_is_refused_in_one_line(tmp_path):
    """Truncated or with bytes overwritten: the unpickler meets every kind of broken zip."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model_name": "resnet", "model": {"w": torch.arange(64.0)}, "epoch": 1})
    good = path.read_bytes()
    rng = random.Random(1)
    for i in range(200):
        data = bytearray(good)
        if i % 2:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        broken = tmp_path / f"broken{i}.pt"
        broken.write_bytes(bytes(data))
        try:
            load_checkpoint(broken)
        except UserError:
            pass


def _checkpoint_with(tmp_path, trained, **stats):
    """``trained``'s checkpoint with its mean or std replaced."""
    ckpt = torch.load(trained, weights_only=True)
    ckpt.update(stats)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("stats, named", [
    ({"std": [0.25, 0.0, 0.25]}, "std"),
    ({"std": [0.25, -0.1, 0.25]}, "std"),
    ({"mean": [0.5]}, "mean"),
    ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
    ({"std": "0.25"}, "std"),
])
def test_a_checkpoint_whose_normalization_cannot_be_applied_is_refused(tmp_path, capsys, stats, named):
    trained = tmp_path / "trained.pt"
    save_checkpoint(trained, {"model_name": "ultimus", "args": {}, "model": {}, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "classes": ["a", "b"]})
    assert load_checkpoint(trained, purpose="evaluate")["std"] == [0.25] * 3
    path = _checkpoint_with(tmp_path, trained, **stats)
    with pytest.raises(UserError, match=f"{named} .* is not"):
        load_checkpoint(path, purpose="evaluate")
    images, _ = synthetic_images(1, seed=0)
    png = tmp_path / "x.png"
    Image.fromarray(images[0].transpose(1, 2, 0)).save(png)
    assert predict.main(["--checkpoint", str(path), str(png)]) == 1
    assert f"'s {named} " in one_error_line(capsys)


def test_predict_names_its_own_flag_for_a_missing_checkpoint(tmp_path, capsys):
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert predict.main(["--checkpoint", str(tmp_path / "nope.pt"), str(png)]) == 1
    line = one_error_line(capsys)
    assert "--checkpoint" in line and "--resume" not in line


def test_the_format_marker_is_what_a_checkpoint_is_known_by(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": FORMAT + "-other", "model": {}}, path)
    with pytest.raises(UserError, match="not a checkpoint of this toolkit"):
        load_checkpoint(path)

"""After training: the confusion matrix and per-class accuracy a run records, its error figures,
and predict.py on image files, for each of the three models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train_dilated
import train_resnet
import train_ultimus
from core.report.error_report import confusion_matrix, per_class_accuracy
from core.train.inference import load_trained, prepare, read_image
from tests.conftest import assert_drawn, metrics, one_error_line, synthetic_images

SCRIPTS = {"resnet": train_resnet, "dilated": train_dilated, "ultimus": train_ultimus}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One short run of each model."""
    root = tmp_path_factory.mktemp("runs")
    for name, script in SCRIPTS.items():
        assert script.main(["--data", str(data), "--out", str(root / name), "--epochs", "1", "--batch-size", "50",
                            "--device", "cpu", "--cache-dir", "none", "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory):
    """The synthetic test split's first 30 images as PNG files (lossless: the same pixels)."""
    folder = tmp_path_factory.mktemp("pngs")
    images, _ = synthetic_images(30, seed=1)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:02d}.png")
    return folder


def test_confusion_and_per_class_accuracy_against_a_count_by_hand():
    labels, preds = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(labels, preds, 4)
    expected = np.zeros((4, 4), int)
    for t, p in zip(labels, preds):
        expected[t, p] += 1
    assert np.array_equal(confusion, expected)
    assert per_class_accuracy(confusion, ["a", "b", "c", "d"]) == {"a": 50.0, "b": 100.0, "c": 200 / 3, "d": None}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_run_records_its_confusion_and_draws_its_errors(runs, name):
    out = runs / name
    m = metrics(out)
    confusion = np.asarray(m["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert 100 * np.trace(confusion) / confusion.sum() == pytest.approx(m["final_test_acc"])
    rows = confusion.sum(1)
    assert list(m["per_class_acc"].values()) == pytest.approx(list(100 * np.diag(confusion) / rows))
    for figure in ("confusion.png", "gradcam.png", "misclassified.png"):
        assert_drawn(out / figure)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_predict_gives_the_models_own_top_class(runs, test_pngs, name, capsys):
    checkpoint = runs / name / "last.pt"
    files = sorted(test_pngs.iterdir())
    model, info = load_trained(checkpoint)
    assert info["recipe"] == name and len(info["classes"]) == 10 and not model.training
    x = prepare(np.stack([read_image(f) for f in files]), info, torch.device("cpu"))
    with torch.no_grad():
        plain = model(x).argmax(1)
        flipped = ((model(x) + model(x.flip(3))) / 2).argmax(1)
    for extra, expected in (([], plain), (["--tta"], flipped)):
        capsys.readouterr()
        assert predict.main(["--checkpoint", str(checkpoint), "--topk", "10", "--json", *extra, str(test_pngs)]) == 0
        results = json.loads(capsys.readouterr().out)
        assert [r["path"] for r in results] == [str(f) for f in files]
        assert [info["classes"].index(r["topk"][0]["class"]) for r in results] == expected.tolist()
        for r in results:
            probs = [t["prob"] for t in r["topk"]]
            assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_predict_resizes_any_image_and_writes_grad_cam(runs, tmp_path, capsys):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 60, 3), dtype=np.uint8)).save(big)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(gray)
    assert predict.main(["--checkpoint", str(runs / "ultimus" / "last.pt"), "--gradcam", str(tmp_path / "cams"),
                         str(big), str(gray)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{big}: ") and lines[0].count(",") == 2, "three classes by default"
    assert len(list((tmp_path / "cams").glob("*-gradcam.png"))) == 2
    assert read_image(big).shape == (3, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "notes.jpg").write_text("not an image") and d / "notes.jpg", "cannot read"),
    (lambda d: d / "missing.png", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no image files"),
])
def test_predict_bad_images_get_one_line_naming_them(runs, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert predict.main(["--checkpoint", str(runs / "ultimus" / "last.pt"), str(path)]) == 1
    line = one_error_line(capsys)
    assert message in line and str(path) in line


@pytest.mark.slow
def test_predict_bad_checkpoints_and_topk(runs, test_pngs, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"no")
    assert predict.main(["--checkpoint", str(junk), str(test_pngs)]) == 1
    assert "not a readable checkpoint" in one_error_line(capsys)
    for k in ("0", "11"):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--checkpoint", str(runs / "ultimus" / "last.pt"), "--topk", k, str(test_pngs)])
        assert exit_info.value.code == 2 and "must lie in 1..10" in one_error_line(capsys)


@pytest.mark.slow
def test_eval_only_writes_the_report_too(runs, data, tmp_path):
    assert train_ultimus.main(["--eval-only", "--resume", str(runs / "ultimus" / "last.pt"), "--data", str(data),
                               "--out", str(tmp_path), "--device", "cpu", "--cache-dir", "none"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert np.asarray(evaluated["confusion"]).sum() == evaluated["total"]
    assert (tmp_path / "gradcam.png").exists() and (tmp_path / "confusion.png").exists()


def test_predict_reads_a_16_bit_png_as_the_dataset_loader_does(tmp_path):
    """Both go through one conversion: a 16-bit image is scaled to 8 bits, not clipped to white."""
    from core.data.sources import _decode_image

    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)).save(deep)
    read = read_image(deep)
    assert np.array_equal(read, _decode_image(deep.read_bytes(), "deep.png"))
    assert read.max() == (1023 * 64) >> 8

"""Tiny synthetic CIFAR-10 look-alikes in every format the loader accepts, and a Ctrl-C."""

import contextlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.train import loop

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n, seed, num_classes=10):
    """Images whose class is visible (a per-class colour), so a tiny run can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    colours = np.stack([(labels * 25) % 250, 250 - (labels * 25) % 250, (labels * 70) % 250], axis=1)
    noise = rng.integers(-40, 40, (n, 3, 32, 32))
    images = np.clip(colours[:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_batches(folder, n_train=100, n_test=50):
    """A cifar-10-batches-py folder: five train batches, a test batch and batches.meta."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_images(n_train, seed=0)
    for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        batch = {"data": images[chunk].reshape(len(chunk), -1), "labels": labels[chunk].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    images, labels = synthetic_images(n_test, seed=1)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": images.reshape(n_test, -1), "labels": labels.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    return folder


def write_image_folder(root, n_train=100, n_test=50, ext="png", classes=CLASSES, num_labels=10):
    """An image folder of ``classes`` drawn from ``num_labels`` labels: a label beyond the class
    names is left out, so fewer names than labels make a dataset with fewer classes."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, seed, num_labels)
        for i, (img, label) in enumerate(zip(images, labels)):
            if label >= len(classes):
                continue
            d = root / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.{ext}", quality=95)
    return root


@pytest.fixture(scope="session")
def cifar(tmp_path_factory):
    """The synthetic CIFAR-10 of the end-to-end tests, in the official batch format: ``cifar(n_train,
    n_test)`` writes each size once a session, for the tests to read and never to change."""
    written = {}

    def of_size(n_train, n_test):
        if (n_train, n_test) not in written:
            folder = tmp_path_factory.mktemp(f"cifar{n_train}-{n_test}") / "cifar-10-batches-py"
            written[n_train, n_test] = write_batches(folder, n_train=n_train, n_test=n_test)
        return written[n_train, n_test]

    return of_size


@pytest.fixture(scope="module")
def data(cifar):
    """200 training and 100 test images: what most end-to-end tests train on."""
    return cifar(200, 100)


def tiny_run(data, out, *extra, epochs=2, lr=(), device="cpu"):
    """A train script's command line for a tiny seeded run on ``data``: batch 50, no cache, plain
    log lines; ``lr`` (max and min) makes it peak after the first epoch; ``extra`` comes last, so
    a flag given there wins."""
    schedule = ["--max-at-epoch", "1", "--lr-max", str(lr[0]), "--lr-min", str(lr[1])] if lr else []
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), "--batch-size", "50", *schedule,
            "--device", device, "--cache-dir", "none", "--no-progress", "--seed", "0", *extra]


@pytest.fixture
def batches_dir(tmp_path):
    return write_batches(tmp_path / "official" / "cifar-10-batches-py").parent


@pytest.fixture
def image_dir(tmp_path):
    return write_image_folder(tmp_path / "imgs")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@contextlib.contextmanager
def ctrl_c_in_second_epoch(monkeypatch):
    """Inside the block, a run's second epoch raises KeyboardInterrupt as Ctrl-C would."""
    real_epoch, calls = loop.train_epoch, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", interrupting)
    try:
        yield
    finally:
        monkeypatch.setattr(loop, "train_epoch", real_epoch)


def metrics(out):
    """A run's metrics.json."""
    return json.loads((Path(out) / "metrics.json").read_text())


def epoch_figures(out):
    """A run's per-epoch history without its wall times: what an exact resume must repeat."""
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in metrics(out)["history"]]


def assert_drawn(path, min_size=(300, 200)):
    """``path`` is a PNG of at least ``min_size`` pixels with something drawn on it: more than the
    two colours of an empty axes frame."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, f"{path} is nearly blank"


def one_error_line(capsys):
    """What a refused command printed: exactly one line on stderr, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]

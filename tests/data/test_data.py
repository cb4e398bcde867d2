"""Every data source the loader accepts, its cache, subsets, batching, and its refusals."""

import functools
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.dataset import Split, load_dataset
from core.data.loader import DeviceLoader, channel_stats
from core.data.subsets import balanced_subset
from core.errors import UserError
from tests.conftest import CLASSES, synthetic_images, write_batches, write_image_folder


def check(ds, n_train=100, n_test=50):
    assert ds.classes == CLASSES
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (n_test, 3, 32, 32)
    assert np.bincount(ds.train.labels).tolist() == [n_train // 10] * 10


def test_official_batches_folder_and_its_parent(batches_dir, cache):
    expected, labels = synthetic_images(100, seed=0)
    for path in (batches_dir, batches_dir / "cifar-10-batches-py"):
        ds = load_dataset(path, cache_dir=None)
        check(ds)
        order = np.argsort(ds.train.labels, kind="stable")
        np.testing.assert_array_equal(ds.train.images[order], expected[np.argsort(labels, kind="stable")])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_labels_follow_sorted_class_folders(tmp_path, ext):
    root = write_image_folder(tmp_path / "imgs", ext=ext)
    ds = load_dataset(root, cache_dir=None)
    check(ds)
    expected, labels = synthetic_images(100, seed=0)
    first_truck = expected[labels == 9][0].astype(int)
    got = ds.train.images[ds.train.labels == 9][0].astype(int)
    if ext == "png":
        np.testing.assert_array_equal(got, first_truck)
    else:  # jpg is lossy, but keeps each channel's mean colour
        np.testing.assert_allclose(got.mean(axis=(1, 2)), first_truck.mean(axis=(1, 2)), atol=4)


def test_image_folder_one_level_down_is_found(tmp_path):
    write_image_folder(tmp_path / "outer" / "cifar10-jpeg")
    check(load_dataset(tmp_path / "outer", cache_dir=None))


@pytest.mark.parametrize("kind", ["batches", "images"])
@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar"])
def test_archives_of_either_layout(tmp_path, kind, suffix):
    if kind == "batches":
        src, arcname = write_batches(tmp_path / "b" / "cifar-10-batches-py"), "cifar-10-batches-py"
    else:
        src, arcname = write_image_folder(tmp_path / "i"), "cifar10-jpeg"
    archive = tmp_path / f"data{suffix}"
    with tarfile.open(archive, "w:gz" if suffix != ".tar" else "w") as tar:
        tar.add(src, arcname=arcname)
    check(load_dataset(archive, cache_dir=None))
    assert sorted(os.listdir(tmp_path)) == sorted(["b" if kind == "batches" else "i", archive.name]), \
        "reading an archive writes nothing beside it"


def test_one_source_typed_relative_and_absolute_is_cached_once(image_dir, cache, monkeypatch):
    load_dataset(image_dir, cache_dir=cache)
    monkeypatch.chdir(image_dir.parent)
    load_dataset(image_dir.name, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1


def test_cache_is_used_and_invalidated_when_the_source_changes(image_dir, cache):
    first = load_dataset(image_dir, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    cached = load_dataset(image_dir, cache_dir=cache)
    np.testing.assert_array_equal(first.train.images, cached.train.images)
    victim = sorted((image_dir / "train" / "cat").iterdir())[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(victim)
    os.utime(victim, ns=(1, 1))
    changed = load_dataset(image_dir, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    assert not np.array_equal(first.train.images, changed.train.images)


def test_test_split_alone_is_enough_when_training_is_not_needed(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_train=0)
    ds = load_dataset(root, need_train=False, cache_dir=None)
    assert ds.train is None and len(ds.test.labels) == 50
    with pytest.raises(UserError, match="no train"):
        load_dataset(root, cache_dir=None)


def test_balanced_subset_is_fixed_and_even():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    idx = balanced_subset(labels, 23, 10)
    assert len(idx) == 23 and list(idx) == sorted(idx)
    assert np.bincount(labels[idx], minlength=10).tolist() == [3, 3, 3] + [2] * 7
    for c in range(10):
        assert list(idx[labels[idx] == c]) == list(np.flatnonzero(labels == c)[:np.sum(labels[idx] == c)])
    assert len(balanced_subset(labels, 10_000, 10)) == 500


def test_channel_stats_match_numpy():
    images, _ = synthetic_images(40, seed=3)
    mean, std = channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-4)


def test_loader_batches_normalizes_and_shuffles_reproducibly():
    images, labels = synthetic_images(100, seed=0)
    split = Split(images, labels)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

    def epoch(seed):
        loader = DeviceLoader(split, torch.device("cpu"), 32, mean, std, train=True,
                              order_generator=torch.Generator().manual_seed(seed))
        return list(loader)

    a, b = epoch(0), epoch(0)
    assert len(a) == 3 and all(len(y) == 32 for _, y in a), "drop_last for training"
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, epoch(1)))
    test = list(DeviceLoader(split, torch.device("cpu"), 32, mean, std, train=False))
    assert [len(y) for _, y in test] == [32, 32, 32, 4], "test keeps every image, in order"
    assert torch.equal(torch.cat([y for _, y in test]), torch.from_numpy(labels))
    expected = (torch.from_numpy(images[:32]).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(test[0][0], expected)


# ----------------------------------------------------------------- refusals


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nope", cache_dir=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        load_dataset(tmp_path / "empty", cache_dir=None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no CIFAR-10 data"):
        load_dataset(tmp_path / "junk", cache_dir=None)


def test_unreadable_path(tmp_path, monkeypatch):
    d = write_image_folder(tmp_path / "imgs")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(d) else real_access(p, mode))
    with pytest.raises(UserError, match="not readable"):
        load_dataset(d, cache_dir=None)


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(UserError, match="not a readable tar archive"):
        load_dataset(bad, cache_dir=None)


def test_archive_member_escaping_the_folder_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(UserError, match="escapes the target folder"):
        load_dataset(evil, cache_dir=None)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_archive_with_a_link_is_refused(tmp_path):
    link_tar = tmp_path / "link.tar"
    with tarfile.open(link_tar, "w") as tar:
        info = tarfile.TarInfo("cifar/train/cat/0001.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UserError, match="is a link"):
        load_dataset(link_tar, cache_dir=None)


def test_image_of_the_wrong_size_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "0005.png"
    Image.fromarray(np.zeros((28, 30, 3), np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"0005\.png is 30x28, not 32x32"):
        load_dataset(root, cache_dir=None)


def test_classes_that_differ_between_train_and_test(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "test" / "truck").rename(root / "test" / "lorry")
    with pytest.raises(UserError, match="classes differ"):
        load_dataset(root, cache_dir=None)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_batches(tmp_path / "cifar-10-batches-py")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(UserError, match="not a CIFAR-10 python batch"):
        load_dataset(folder, cache_dir=None)
    assert not (tmp_path / "pwned").exists()


def interrupted_cifar10(failure):
    """torchvision's CIFAR10(root, download=True) cut off half way through writing its archive
    under ``root``, as a dropped connection or a Ctrl-C leaves it."""

    def cifar10(root, train, download):
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial archive")
        raise failure

    return cifar10


@pytest.mark.parametrize("failure, raised", [
    (OSError("Temporary failure in name resolution"), UserError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, failure, raised):
    """Not even the folder: a partial archive in ./data would stop the next run from downloading."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", interrupted_cifar10(failure))
    with pytest.raises(raised, match="pass --data PATH to a local copy" if raised is UserError else None):
        load_dataset(tmp_path / "data", download=True, cache_dir=None)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # a folder the user made stays, empty, as it was
    with pytest.raises(raised):
        load_dataset(tmp_path / "empty", download=True, cache_dir=None)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.fixture
def cifar_server(tmp_path, monkeypatch):
    """A local web server in place of the official one, serving a synthetic cifar-10-python.tar.gz,
    with torchvision's CIFAR10 pointed at it and told the checksums of its files: the real
    download, checksum and extraction code then runs as it does against the internet."""
    import hashlib
    import http.server
    import threading

    import torchvision.datasets

    def md5(path):
        return hashlib.md5(path.read_bytes()).hexdigest()

    site = tmp_path / "site"
    batches = write_batches(site / "cifar-10-batches-py")
    with tarfile.open(site / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(batches / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(batches / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names",
                                      "md5": md5(batches / "batches.meta")})
    monkeypatch.setattr(cls, "tgz_md5", md5(site / "cifar-10-python.tar.gz"))
    monkeypatch.setenv("no_proxy", "*")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
    yield site
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_real_download_verifies_extracts_and_keeps_only_the_batches(tmp_path, cifar_server):
    root = tmp_path / "work" / "data"
    check(load_dataset(root, download=True, cache_dir=None))
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]
    assert [p.name for p in root.parent.iterdir()] == ["data"]


@pytest.mark.slow
def test_real_download_with_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, cifar_server, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", "0" * 32)  # as if the transfer was corrupted
    (tmp_path / "work").mkdir()
    with pytest.raises(UserError, match="could not download CIFAR-10"):
        load_dataset(tmp_path / "work" / "data", download=True, cache_dir=None)
    assert list((tmp_path / "work").iterdir()) == []


def test_loader_alternates_flips_by_epoch_and_drops_the_recipe_flip():
    images, labels = synthetic_images(64, seed=0)
    split = Split(images, labels)
    first = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    calls = []

    def recipe(x, generator, mean, std, flip=True):
        calls.append(flip)
        return x

    loader = DeviceLoader(split, torch.device("cpu"), 64, [0.5] * 3, [0.25] * 3, train=True, augment=recipe,
                          order_generator=torch.Generator().manual_seed(0), first_flips=first)
    plain = loader.normalize(torch.from_numpy(images))
    for epoch in range(3):
        loader.set_epoch(epoch)
        (x, y), = list(loader)
        # each row's source image, matched in either orientation (the noise images are not symmetric)
        rows = [int(torch.nonzero(((plain == xi) | (plain == xi.flip(2))).flatten(1).all(1))[0]) for xi in x]
        flipped = torch.tensor([bool((x[i] == plain[r].flip(2)).all()) for i, r in enumerate(rows)])
        assert torch.equal(flipped, first[rows] ^ bool(epoch % 2)), f"epoch {epoch}"
    assert calls == [False] * 3, "the recipe's own random flip is off"

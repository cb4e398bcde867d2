"""Data that would train on wrong labels, eat the memory or fail halfway is refused or read right:
batch files, 16-bit PNGs, file names that are not UTF-8, archives with large members, an
official archive left in ./data."""

import hashlib
import io
import os
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from core.data.dataset import load_dataset
from core.errors import UserError
from tests.conftest import write_batches, write_image_folder


def rewrite_batch(folder, name, edit, protocol=pickle.DEFAULT_PROTOCOL):
    batch = pickle.loads((folder / name).read_bytes())
    edit(batch)
    (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))


def test_a_batch_with_fewer_labels_than_images_is_refused(tmp_path):
    """Accepted, every label after the gap would belong to the wrong image."""
    folder = write_batches(tmp_path / "cifar-10-batches-py")
    rewrite_batch(folder, "data_batch_2", lambda b: b.update(labels=b["labels"][:-5]))
    with pytest.raises(UserError, match="data_batch_2 holds 20 images but 15 labels"):
        load_dataset(folder, cache_dir=None)


def test_a_label_outside_the_classes_is_refused(tmp_path):
    folder = write_batches(tmp_path / "cifar-10-batches-py")
    rewrite_batch(folder, "test_batch", lambda b: b["labels"].__setitem__(3, 10))
    with pytest.raises(UserError, match="test_batch has label 10, outside the 10 classes"):
        load_dataset(folder, cache_dir=None)


def test_batches_pickled_with_protocol_2_load_the_same(tmp_path):
    """Protocol 2 stores bytes through _codecs.encode, which the safe unpickler must allow."""
    plain = load_dataset(write_batches(tmp_path / "a" / "cifar-10-batches-py"), cache_dir=None)
    folder = write_batches(tmp_path / "b" / "cifar-10-batches-py")
    for name in ("data_batch_1", "test_batch"):
        rewrite_batch(folder, name, lambda b: None, protocol=2)
    assert b"_codecs" in (folder / "test_batch").read_bytes()
    again = load_dataset(folder, cache_dir=None)
    np.testing.assert_array_equal(plain.train.images, again.train.images)
    np.testing.assert_array_equal(plain.test.labels, again.test.labels)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_train=10, n_test=10)
    target = sorted((root / "test" / "airplane").iterdir())[0]
    deep = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    Image.fromarray(deep).save(target)
    assert Image.open(target).mode.startswith("I")
    ds = load_dataset(root, cache_dir=None)
    index = sorted(os.listdir(root / "test" / "airplane")).index(target.name)
    got = ds.test.images[np.flatnonzero(ds.test.labels == 0)[index]]
    expected = (deep >> 8).astype(np.uint8)
    assert all(np.array_equal(got[c], expected) for c in range(3))


def test_a_file_name_that_is_not_utf8_loads_and_caches(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_train=20, n_test=10)
    cats = root / "train" / "cat"
    first = sorted(cats.iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(cats), b"\xff\xfe-cat.png"))
    ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert len(ds.train.labels) == 20
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def archive_with(tmp_path, extra_name, extra_size):
    src = write_image_folder(tmp_path / "imgs", n_train=50, n_test=20)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar")
        info = tarfile.TarInfo(extra_name)
        info.size = extra_size
        tar.addfile(info, io.BytesIO(bytes(extra_size)))
    return archive


@pytest.mark.slow
def test_an_archive_member_the_dataset_does_not_need_is_never_read(tmp_path):
    big = 64 << 20
    archive = archive_with(tmp_path, "cifar/notes/huge.txt", big)
    tracemalloc.start()
    try:
        ds = load_dataset(archive, cache_dir=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds.train.labels) == 50
    assert peak < big // 8, f"the load held {peak:,} bytes"


def test_an_image_member_too_large_for_an_image_is_refused_unread(tmp_path):
    archive = archive_with(tmp_path, "cifar/train/cat/zz-huge.png", 3 << 20)
    with pytest.raises(UserError, match=r"zz-huge.png is 3,145,728 bytes, too large"):
        load_dataset(archive, cache_dir=None)


def official_archive(tmp_path):
    """A stand-in for cifar-10-python.tar.gz as the download leaves it, before extraction."""
    batches = write_batches(tmp_path / "src" / "cifar-10-batches-py")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    return data, hashlib.md5((data / "cifar-10-python.tar.gz").read_bytes()).hexdigest()


def test_an_official_archive_left_in_data_is_used_after_its_checksum(tmp_path, monkeypatch):
    import torchvision.datasets

    data, md5 = official_archive(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)
    ds = load_dataset(data, download=True, cache_dir=None)
    assert len(ds.train.labels) == 100 and len(ds.test.labels) == 50
    assert sorted(os.listdir(data)) == ["cifar-10-python.tar.gz"]


def test_a_damaged_official_archive_in_data_is_named(tmp_path, monkeypatch):
    import torchvision.datasets

    data, _ = official_archive(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz is incomplete or damaged"):
        load_dataset(data, download=True, cache_dir=None)

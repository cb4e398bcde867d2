"""CIFAR-10 from wherever the user has it, decoded once into uint8 arrays.

``--data PATH`` may name a folder holding ``cifar-10-batches-py/`` (the official python
version, downloaded there when missing), that folder itself, an image-folder root with
``train/<class>/*`` and ``test/<class>/*``, or a ``.tar``/``.tar.gz``/``.tgz`` of either
(``core.data.sources`` reads each).

Decoding tens of thousands of JPEGs is slow, so decoded splits are cached as ``.npz`` keyed by
the source's path, sizes and modification times: a second run starts in seconds, and a changed
source is decoded again.
"""

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs.outputs import temp_path
from .sources import ARCHIVE_SUFFIXES, BATCHES_DIR, Dataset, Split, load_archive, load_folder

OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
DEFAULT_CACHE = Path(os.environ.get("CIFAR_TOOLKIT_CACHE", Path.home() / ".cache" / "cifar-toolkit"))

__all__ = ["DEFAULT_CACHE", "Dataset", "Split", "download_cifar10", "load_dataset"]


def download_cifar10(root):
    """Fetch the official python version into ``root`` with torchvision's checksum verification.

    The download and its extraction happen in a staging folder beside ``root``, and only the
    verified ``cifar-10-batches-py/`` is moved in. A failed or interrupted download therefore
    leaves nothing behind: no empty ``root``, and no partial archive that would make ``root``
    non-empty, so the next run would reject it as holding no CIFAR-10 instead of downloading again.
    """
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise UserError("downloading CIFAR-10 needs torchvision (pip install torchvision), "
                        "or pass --data PATH to a local copy") from None
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-download-", dir=root.parent))
    try:
        CIFAR10(str(staging), train=True, download=True)
        CIFAR10(str(staging), train=False, download=True)
        root.mkdir(exist_ok=True)
        os.replace(staging / BATCHES_DIR, root / BATCHES_DIR)
    except Exception as exc:  # URLError, timeouts, checksum failures, ...
        raise UserError(f"could not download CIFAR-10 into {root} ({exc.__class__.__name__}: {exc}); "
                        f"without internet, pass --data PATH to a local copy (cifar-10-batches-py folder, "
                        f"image folder, or .tar.gz)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- cache


def _fingerprint(path):
    """The cache key of ``path``: its files, named from the resolved path, so that one source
    typed two ways (relative and absolute) is decoded once, with their sizes and times."""
    # os.fsencode, not str.encode: a file name that is not UTF-8 holds surrogates that UTF-8 refuses
    path = path.resolve()
    h = hashlib.sha256(os.fsencode(path))
    entries = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in entries:
        st = p.stat()
        h.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _official_archive(folder):
    """The official archive a download left in ``folder`` without extracting it (torchvision's own
    download, a copy by hand), verified by torchvision's checksum, or None when there is none."""
    archive = folder / OFFICIAL_ARCHIVE
    if not folder.is_dir() or (folder / BATCHES_DIR).exists() or not archive.is_file():
        return None
    from torchvision.datasets import CIFAR10  # lazy: torchvision pulls in much that training never uses

    digest = hashlib.md5()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != CIFAR10.tgz_md5:
        raise UserError(f"{archive} is incomplete or damaged (its checksum is not the official one): delete it "
                        f"to download CIFAR-10 again, or pass --data PATH to a local copy")
    return archive


def _cache_load(file, need_train):
    try:
        with np.load(file, allow_pickle=False) as z:
            train = Split(z["train_images"], z["train_labels"]) if "train_images" in z else None
            if need_train and train is None:
                return None
            return Dataset(train, Split(z["test_images"], z["test_labels"]), [str(c) for c in z["classes"]])
    except Exception:
        return None  # a damaged cache is just decoded again


def _cache_save(file, ds):
    arrays = {"test_images": ds.test.images, "test_labels": ds.test.labels, "classes": np.array(ds.classes)}
    if ds.train is not None:
        arrays.update(train_images=ds.train.images, train_labels=ds.train.labels)
    tmp = temp_path(file, ".npz")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, file)
    except OSError as exc:  # caching is an optimization: a read-only home or a full disk must not stop training
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"warning: could not cache the decoded images in {file.parent} ({exc.strerror or exc}); "
              f"going on without the cache", file=sys.stderr)


def load_dataset(data, need_train=True, download=False, cache_dir=DEFAULT_CACHE, progress=True):
    """Load CIFAR-10 from ``data`` (see the module docstring), downloading it there if asked.

    ``need_train=False`` accepts a source with only a test split (for --eval-only). ``progress``:
    a bar while image files are decoded, else a line every few thousand.
    """
    path = Path(data).expanduser()
    if download and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
        download_cifar10(path)
    if download:
        path = _official_archive(path) or path
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass --data PATH to CIFAR-10 "
                        f"(cifar-10-batches-py folder, image folder or .tar.gz), or omit --data to download it")
    if not os.access(path, os.R_OK):
        raise UserError(f"data path {path} is not readable: check its permissions")
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"data folder {path} is empty: put CIFAR-10 there or point --data elsewhere")
    if path.is_file() and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{path} is a file but not a .tar, .tar.gz or .tgz archive")
    cache = Path(cache_dir) / f"cifar10-{_fingerprint(path)}.npz" if cache_dir is not None else None
    ds = _cache_load(cache, need_train) if cache is not None and cache.exists() else None
    if ds is None:
        ds = load_archive(path, need_train, progress) if path.is_file() else load_folder(path, need_train, progress)
        if cache is not None:
            _cache_save(cache, ds)
    if len(ds.classes) < 2:
        raise UserError(f"{path} holds {len(ds.classes)} class ({', '.join(ds.classes)}): a classifier needs at "
                        f"least two, each a folder of images under train/ and test/")
    return ds

"""CIFAR-10 from wherever the user has it, decoded once into uint8 arrays and held on the device.

Sources for ``--data PATH``: a folder holding ``cifar-10-batches-py/`` (the official python
version, downloaded there when missing), that folder itself, an image-folder root with
``train/<class>/*`` and ``test/<class>/*``, or a ``.tar``/``.tar.gz``/``.tgz`` of either. Archives
are read member by member in memory after every member's path is checked, so nothing is
written outside the cache and a member that climbs out of the archive's root is refused.

Decoding 60k JPEGs takes a while, so decoded splits are cached as ``.npz`` keyed by the source's
path, sizes and modification times: a second run starts in seconds, and a changed source is
decoded again.
"""

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import alternating_flip
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
DEFAULT_CACHE = Path(os.environ.get("CIFAR_TOOLKIT_CACHE", Path.home() / ".cache" / "cifar-toolkit"))


@dataclass
class Split:
    images: np.ndarray  # (N, 3, 32, 32) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class Dataset:
    train: Split  # None when only a test split was asked for and none exists
    test: Split
    classes: list


# --------------------------------------------------------------------------- decoding


def _decode_image(raw, name):
    from PIL import Image  # lazy: only image folders need it

    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for a bad file
        raise UserError(f"cannot decode image {name}: {exc}") from None
    if arr.shape[:2] != (32, 32):
        raise UserError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, not 32x32: CIFAR-10 images are 32x32")
    return arr.transpose(2, 0, 1)


def _stack(images, labels):
    return Split(np.ascontiguousarray(np.stack(images)), np.asarray(labels, dtype=np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the official batch files while refusing anything but numpy arrays and builtins,
    so a crafted pickle cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _read_batch(raw, name):
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = batch.get("labels", batch.get("fine_labels"))
        return data, list(labels)
    except Exception as exc:
        raise UserError(f"{name} is not a CIFAR-10 python batch file ({exc})") from None


def _read_batches(read, names, where):
    images, labels = [], []
    for name in names:
        data, lab = _read_batch(read(name), f"{where}/{name}")
        images.append(data)
        labels += lab
    return Split(np.concatenate(images), np.asarray(labels, dtype=np.int64))


def _official_classes(read):
    try:
        meta = _ArrayUnpickler(io.BytesIO(read("batches.meta")), encoding="latin1").load()
        return list(meta["label_names"])
    except Exception:
        return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _from_batches(read, exists, where, need_train):
    if not exists("test_batch"):
        raise UserError(f"{where} has no test_batch: not a complete cifar-10-batches-py folder")
    missing = [n for n in TRAIN_BATCHES if not exists(n)]
    if need_train and missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: not a complete cifar-10-batches-py folder")
    train = None if missing else _read_batches(read, TRAIN_BATCHES, where)
    return Dataset(train, _read_batches(read, ["test_batch"], where), _official_classes(read))


def _from_image_files(files, read, where, need_train):
    """``files`` maps 'train'/'test' to {class: [file names]}; ``read(name)`` gives the bytes."""
    test = files.get("test") or {}
    train = files.get("train") or {}
    if not test:
        raise UserError(f"{where} has no test/<class>/ images: expected train/<class>/*.jpg|png and test/<class>/*")
    if need_train and not train:
        raise UserError(f"{where} has no train/<class>/ images: expected train/<class>/*.jpg|png and test/<class>/*")
    if train and sorted(train) != sorted(test):
        raise UserError(f"{where}: classes differ between train ({', '.join(sorted(train))}) "
                        f"and test ({', '.join(sorted(test))})")
    classes = sorted(test)

    def split(per_class):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for name in sorted(per_class[cls]):
                images.append(_decode_image(read(name), f"{where}/{name}"))
                labels.append(label)
        return _stack(images, labels)

    return Dataset(split(train) if train else None, split(test), classes)


def _group_image_files(paths):
    """Group relative image paths '<prefix>/<split>/<class>/<file>' by split and class."""
    files, roots = {}, set()
    for p in paths:
        parts = Path(p).parts
        if len(parts) < 3 or not p.lower().endswith(IMAGE_SUFFIXES) or parts[-3] not in ("train", "test"):
            continue
        roots.add(parts[:-3])
        files.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(p)
    return files, roots


# --------------------------------------------------------------------------- sources


def _load_folder(root, need_train):
    batches = root / BATCHES_DIR if (root / BATCHES_DIR).is_dir() else root
    if (batches / "test_batch").exists() or (batches / "data_batch_1").exists():
        return _from_batches(lambda n: (batches / n).read_bytes(), lambda n: (batches / n).exists(),
                             str(batches), need_train)
    rel = [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file()]
    files, roots = _group_image_files(rel)
    if not files:
        raise UserError(f"{root} holds no CIFAR-10 data: expected cifar-10-batches-py/, "
                        f"or train/<class>/*.jpg|png and test/<class>/*")
    if len(roots) > 1:
        raise UserError(f"{root} holds several image-folder roots ({', '.join('/'.join(r) or '.' for r in roots)}): "
                        f"point --data at one of them")
    return _from_image_files(files, lambda n: (root / n).read_bytes(), str(root), need_train)


def _safe_members(tar, path):
    """The archive's regular files by name, refusing members that would land outside its root."""
    members = {}
    for m in tar.getmembers():
        name = m.name
        if name.startswith(("/", "\\")) or ".." in Path(name).parts or os.path.isabs(name):
            raise UserError(f"{path}: archive member {name!r} escapes the target folder; refusing the archive")
        if m.issym() or m.islnk():
            raise UserError(f"{path}: archive member {name!r} is a link; refusing the archive")
        if m.isfile():
            members[os.path.normpath(name)] = m
    return members


def _load_archive(path, need_train):
    try:
        with tarfile.open(path) as tar:
            members = _safe_members(tar, path)
            # Read in archive order: a gzip stream cannot seek backwards without starting over.
            blobs = {name: tar.extractfile(m).read() for name, m in members.items()}
            read = blobs.__getitem__

            batch_dirs = {os.path.dirname(n) for n in members if os.path.basename(n) == "test_batch"}
            if batch_dirs:
                d = sorted(batch_dirs)[0]
                full = lambda n: os.path.join(d, n) if d else n  # noqa: E731
                return _from_batches(lambda n: read(full(n)), lambda n: full(n) in blobs, str(path), need_train)
            files, roots = _group_image_files(blobs)
            if not files:
                raise UserError(f"{path} holds no CIFAR-10 data: expected cifar-10-batches-py/ or train/ and test/ image folders")
            if len(roots) > 1:
                raise UserError(f"{path} holds several image-folder roots; pack only one")
            return _from_image_files(files, read, str(path), need_train)
    except (tarfile.TarError, EOFError, OSError, KeyError) as exc:
        reason = (str(exc).splitlines() or [""])[0].rstrip(":")  # tarfile's messages run over several lines
        raise UserError(f"{path} is not a readable tar archive ({exc.__class__.__name__}: {reason}); "
                        f"re-download or re-pack it") from None


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
    h = hashlib.sha256(str(path.resolve()).encode())
    entries = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in entries:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


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
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, file)
    except OSError:
        pass  # caching is an optimization; a read-only home must not stop training


def load_dataset(data, need_train=True, download=False, cache_dir=DEFAULT_CACHE):
    """Load CIFAR-10 from ``data`` (see the module docstring), downloading it there if asked.

    ``need_train=False`` accepts a source with only a test split (for --eval-only).
    """
    path = Path(data).expanduser()
    if download and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
        download_cifar10(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass --data PATH to CIFAR-10 "
                        f"(cifar-10-batches-py folder, image folder or .tar.gz), or omit --data to download it")
    if not os.access(path, os.R_OK):
        raise UserError(f"data path {path} is not readable: check its permissions")
    if path.is_dir() and not any(path.iterdir()):
        raise UserError(f"data folder {path} is empty: put CIFAR-10 there or point --data elsewhere")
    if path.is_file() and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{path} is a file but not a .tar, .tar.gz or .tgz archive")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"cifar10-{_fingerprint(path)}.npz"
        if cache.exists():
            ds = _cache_load(cache, need_train)
            if ds is not None:
                return ds
    ds = _load_archive(path, need_train) if path.is_file() else _load_folder(path, need_train)
    if cache is not None:
        _cache_save(cache, ds)
    return ds


# --------------------------------------------------------------------------- selection and batching


def balanced_subset(labels, n, num_classes):
    """The first ``n`` indices in dataset order with the classes as equal as possible.

    Each class gives its first n // C images, and the first n % C classes one more, so quick
    runs on a subset see every class and always the same images.
    """
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    picks = []
    for c in range(num_classes):
        quota = n // num_classes + (1 if c < n % num_classes else 0)
        picks.append(np.flatnonzero(labels == c)[:quota])
    return np.sort(np.concatenate(picks))


def channel_stats(images):
    """Per-channel mean and std of uint8 images, in 0..1 pixel space."""
    x = images.reshape(images.shape[0], 3, -1)
    mean = x.mean(axis=(0, 2), dtype=np.float64) / 255
    sq = (x.astype(np.float32) / 255) ** 2
    std = np.sqrt(sq.mean(axis=(0, 2), dtype=np.float64) - mean ** 2)
    return mean.tolist(), std.tolist()


class DeviceLoader:
    """Batches of a split held on the device as uint8, normalized (and augmented) per batch.

    Training order comes from ``order_generator`` (a CPU generator: one randperm per epoch);
    augmentation draws from ``aug_generator`` on the device. Saving both generators' states
    between epochs is what makes a resumed run exact.

    ``first_flips`` (one bool per image) replaces the recipe's random flip with
    ``augment.alternating_flip``, which needs the epoch: call ``set_epoch`` before each one, as
    with torch's DistributedSampler.
    """

    def __init__(self, split, device, batch_size, mean, std, *, train, augment=None,
                 order_generator=None, aug_generator=None, channels_last=False, first_flips=None):
        self.images = torch.from_numpy(split.images).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.order_generator = order_generator
        self.aug_generator = aug_generator
        self.channels_last = channels_last
        self.first_flips = None if first_flips is None else first_flips.to(device)
        self.epoch = 0
        self.mean, self.std = mean, std
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def normalize(self, images):
        return (images.float() / 255 - self._mean) / self._std

    def __iter__(self):
        if self.train:
            order = torch.randperm(len(self.labels), generator=self.order_generator).to(self.images.device)
        for i in range(len(self)):
            if self.train:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.normalize(self.images[idx]), self.labels[idx]
                if self.first_flips is not None:
                    x = alternating_flip(x, self.first_flips[idx], self.epoch)
                if self.augment is not None:
                    x = self.augment(x, self.aug_generator, self.mean, self.std, flip=self.first_flips is None)
            else:
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                x, y = self.normalize(self.images[sl]), self.labels[sl]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

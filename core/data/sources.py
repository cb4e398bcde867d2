"""Reading CIFAR-10 out of what a user has: the official python batch files, an image folder
with ``train/<class>/*`` and ``test/<class>/*``, or a ``.tar``/``.tar.gz``/``.tgz`` of either.

Archives are read member by member in memory after every member's path is checked, so nothing
is written anywhere and a member that climbs out of the archive's root is refused. Batch files
are unpickled with a loader that admits numpy arrays and builtins only.
"""

import contextlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..progress import Ticker

# What PIL decodes: the image files an image folder, an archive or predict.py may hold.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
BATCH_FILES = [*TRAIN_BATCHES, "test_batch", "batches.meta"]
# Larger members are refused unread: a 32x32 image is a few kB, an official batch file 31 MB.
MAX_IMAGE_BYTES = 1 << 20
MAX_BATCH_BYTES = 256 << 20


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


def rgb_image(im):
    """A PIL image as 8-bit RGB, the way the models see every image: the dataset's files and
    predict.py's alike. 16-bit grayscale is scaled to 8 bits, where convert("RGB") would clip it
    to white."""
    from PIL import Image  # lazy: only image files need it

    if im.mode.startswith("I"):
        gray = (np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return im.convert("RGB")


def _decode_image(raw, name):
    from PIL import Image  # lazy: only image folders need it

    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(rgb_image(im))
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

    # _codecs.encode turns a string back into bytes: how protocol-2 pickles store bytes.
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _read_batch(raw, name, num_classes):
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(list(batch.get("labels", batch.get("fine_labels"))), dtype=np.int64)
    except Exception as exc:
        raise UserError(f"{name} is not a CIFAR-10 python batch file ({exc})") from None
    if len(labels) != len(data):  # else every label after the gap would belong to another image
        raise UserError(f"{name} holds {len(data)} images but {len(labels)} labels: re-create or re-download it")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise UserError(f"{name} has label {outside[0]}, outside the {num_classes} classes of its batches.meta")
    return data, labels


def _read_batches(read, names, where, num_classes):
    parts = [_read_batch(read(name), f"{where}/{name}", num_classes) for name in names]
    return Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _official_classes(read, exists):
    if exists("batches.meta"):
        try:
            meta = _ArrayUnpickler(io.BytesIO(read("batches.meta")), encoding="latin1").load()
            return [str(name) for name in meta["label_names"]]
        except Exception:
            pass  # an unreadable meta file loses only the names
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _from_batches(read, exists, where, need_train):
    if not exists("test_batch"):
        raise UserError(f"{where} has no test_batch: not a complete cifar-10-batches-py folder")
    missing = [n for n in TRAIN_BATCHES if not exists(n)]
    if need_train and missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: not a complete cifar-10-batches-py folder")
    classes = _official_classes(read, exists)
    train = None if missing else _read_batches(read, TRAIN_BATCHES, where, len(classes))
    return Dataset(train, _read_batches(read, ["test_batch"], where, len(classes)), classes)


def _from_image_files(files, decoded, where, need_train):
    """``files`` maps 'train'/'test' to {class: [file names]}; ``decoded(name)`` gives the image."""
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
                images.append(decoded(name))
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


# A line every this many images decoded, when no bar is drawn: the JPEG copy's 60,000 take a
# while on a laptop's CPU.
DECODE_LOG_EVERY = 10_000


def _decoding(n, where, progress):
    """The ticker of ``n`` images decoded from ``where``, announced in a line first."""
    print(f"Decoding {n:,} images from {where}", flush=True)
    return Ticker(n, "decoded", DECODE_LOG_EVERY, enabled=progress)


def _counted(decode, ticker):
    """``decode`` that steps ``ticker`` after each image."""
    def decode_one(*args):
        image = decode(*args)
        ticker.step()
        return image
    return decode_one


def load_folder(root, need_train, progress=True):
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
    count = sum(len(names) for per_class in files.values() for names in per_class.values())
    with contextlib.closing(_decoding(count, root, progress)) as ticker:
        return _from_image_files(files, _counted(lambda n: _decode_image((root / n).read_bytes(), f"{root}/{n}"),
                                                 ticker), str(root), need_train)


def safe_members(tar, path):
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


def _read_members(tar, members, wanted, limit, path, use):
    """``use(name, bytes)`` of each wanted member, read in archive order (a gzip stream cannot seek
    backwards without starting over); the rest are skipped unread, and a member over ``limit``
    bytes is refused before it is read."""
    for name, member in members.items():
        if name in wanted:
            if member.size > limit:
                raise UserError(f"{path}: archive member {name} is {member.size:,} bytes, too large for what its "
                                f"name says it is (at most {limit:,}); refusing the archive")
            use(name, tar.extractfile(member).read())


def load_archive(path, need_train, progress=True):
    """Only the members the dataset needs are read, and images are decoded as they are read, so
    the load holds little more than the decoded images, whatever else the archive carries."""
    try:
        with tarfile.open(path) as tar:
            members = safe_members(tar, path)
            batch_dirs = {os.path.dirname(n) for n in members if os.path.basename(n) == "test_batch"}
            if batch_dirs:
                d = sorted(batch_dirs)[0]
                full = lambda n: os.path.join(d, n) if d else n  # noqa: E731
                blobs = {}
                _read_members(tar, members, {full(n) for n in BATCH_FILES}, MAX_BATCH_BYTES, path, blobs.__setitem__)
                return _from_batches(lambda n: blobs[full(n)], lambda n: full(n) in blobs, str(path), need_train)
            files, roots = _group_image_files(members)
            if not files:
                raise UserError(f"{path} holds no CIFAR-10 data: expected cifar-10-batches-py/ or train/ and test/ image folders")
            if len(roots) > 1:
                raise UserError(f"{path} holds several image-folder roots; pack only one")
            images = {}
            wanted = {name for per_class in files.values() for names in per_class.values() for name in names}
            with contextlib.closing(_decoding(len(wanted), path, progress)) as ticker:
                decode = _counted(lambda name, raw: _decode_image(raw, f"{path}/{name}"), ticker)
                _read_members(tar, members, wanted, MAX_IMAGE_BYTES, path,
                              lambda name, raw: images.__setitem__(name, decode(name, raw)))
            return _from_image_files(files, images.__getitem__, str(path), need_train)
    except (tarfile.TarError, EOFError, OSError, KeyError) as exc:
        reason = (str(exc).splitlines() or [""])[0].rstrip(":")  # tarfile's messages run over several lines
        raise UserError(f"{path} is not a readable tar archive ({exc.__class__.__name__}: {reason}); "
                        f"re-download or re-pack it") from None

"""Data sets as float tensors in [0, 1], NCHW, read from local files in their original formats.

* ``digits``: scikit-learn's 8x8 digits (embedded in scikit-learn, no download), 1797 images with values
  0..16 scaled to [0, 1]; a fixed stratified split (360 test images, ``random_state=0``).
* ``mnist``: the IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
* ``cifar10``: the python pickle batches ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``
  (read with ``pickle``, as the format requires: only point this at files you trust).
* ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (``scipy.io.loadmat``; label 10 means digit 0).

Files are looked for under the data directory: ``--data-dir``, else ``$ROBUSTKERN_DATA``, else
``~/.robustkern/data`` (torchvision's layouts ``MNIST/raw`` and ``cifar-10-batches-py`` are accepted too).
Nothing is downloaded unless ``download=True`` (``robustkern ... --download``). A download is written to a
hidden temporary file beside its destination, checked against the published MD5 and only then renamed into
place (the CIFAR-10 archive is unpacked into a temporary folder first), so a failed or interrupted download
leaves no partial file; it fails with :class:`DataMissingError` naming the address, the reason and the folder.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from robustkern.models import DATASET_STATS

from .errors import ConfigError, DataFormatError, DataMissingError, optional_import

__all__ = ["DatasetInfo", "DATASETS", "default_data_dir", "dataset_info", "load_dataset", "make_loader",
           "AUGMENTATIONS", "augment_batch", "read_idx", "download_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple  # (C, H, W)
    num_classes: int
    mean: tuple  # per-channel statistics of the training images, for robustkern.nn.Normalize
    std: tuple


DATASETS = {name: DatasetInfo(name, shape, 10, *DATASET_STATS[name])
            for name, shape in (("digits", (1, 8, 8)), ("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)),
                                ("svhn", (3, 32, 32)))}
ALIASES = {"cifar": "cifar10", "cifar-10": "cifar10", "sklearn_digits": "digits"}

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MD5 = {  # of the .gz files, as published with the data set (and checked by torchvision)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/{}_32x32.mat"
SVHN_MD5 = {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b8567e0429"}
DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE = 0, 360


def dataset_info(name: str) -> DatasetInfo:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ConfigError(f"unknown data set '{name}'; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def default_data_dir() -> Path:
    env = os.environ.get("ROBUSTKERN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".robustkern" / "data"


# ---------------------------------------------------------------------------------------------------- readers
def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc})") from None


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's format: 2 zero bytes, type code, number of dims, big-endian int32 dims)."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataFormatError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(data) - header != count * dtype.itemsize:
        raise DataFormatError(f"{path}: IDX header says {dims} ({count * dtype.itemsize} bytes of data), "
                              f"file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(dirs: list[Path], names: list[str], dataset: str, hint: str) -> list[Path]:
    """The directory in ``dirs`` holding all ``names`` (each possibly with ``.gz``), or DataMissingError."""
    for d in dirs:
        found = []
        for n in names:
            for cand in (d / n, d / (n + ".gz")):
                if cand.is_file():
                    found.append(cand)
                    break
        if len(found) == len(names):
            return found
    raise DataMissingError(
        f"{dataset} not found: expected {', '.join(names)} in one of: {', '.join(str(d) for d in dirs)}. "
        f"{hint} Set the folder with --data-dir or $ROBUSTKERN_DATA, or pass --download to fetch it.")


def _load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    dirs = [root / "mnist", root / "MNIST" / "raw", root / "MNIST", root]
    img_path, lbl_path = _find(dirs, list(MNIST_FILES[split]), "MNIST", "(IDX files, optionally gzipped.)")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(f"MNIST files disagree: images {images.shape} in {img_path}, "
                              f"labels {labels.shape} in {lbl_path}")
    return images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)


def _load_cifar(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    dirs = [root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py", root / "cifar10",
            root / "CIFAR10" / "cifar-10-batches-py"]
    names = CIFAR_FILES[split]
    paths = _find(dirs, names, "CIFAR-10", "(python pickle batches, folder 'cifar-10-batches-py'.)")
    xs, ys = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = batch.get(b"data", batch.get("data"))
            labels = batch.get(b"labels", batch.get("labels"))
            x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(labels, dtype=np.int64)
        except Exception as exc:  # any unpickling/reshape failure means the file is not a CIFAR batch
            raise DataFormatError(f"{p}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
        if len(x) != len(y):
            raise DataFormatError(f"{p}: {len(x)} images but {len(y)} labels")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def _load_svhn(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io
    dirs = [root / "svhn", root / "SVHN", root]
    (path,) = _find(dirs, [f"{split}_32x32.mat"], "SVHN", "(cropped-digits .mat files.)")
    try:
        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"])  # (32, 32, 3, N)
        y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except Exception as exc:
        raise DataFormatError(f"{path}: not an SVHN .mat file ({type(exc).__name__}: {exc})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataFormatError(f"{path}: X has shape {x.shape}, y has {len(y)} labels")
    y[y == 10] = 0
    return x.transpose(3, 2, 0, 1).astype(np.float32) / 255.0, y


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    load_digits = optional_import("sklearn.datasets", "scikit-learn", "the digits data set").load_digits
    train_test_split = optional_import("sklearn.model_selection", "scikit-learn",
                                       "the digits data set").train_test_split
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED,
                                          stratify=y)
    return (xtr, ytr) if split == "train" else (xte, yte)


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = False, limit: int = 0) -> TensorDataset:
    """``TensorDataset(images, labels)``: images float32 (N, C, H, W) in [0, 1], labels int64.

    ``limit > 0`` keeps the first ``limit`` examples. Raises :class:`DataMissingError` naming the expected
    files and folders when they are absent (and ``download`` is False).
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got '{split}'")
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if info.name == "digits":
        x, y = _load_digits(split)
    else:
        loader = {"mnist": _load_mnist, "cifar10": _load_cifar, "svhn": _load_svhn}[info.name]
        try:
            x, y = loader(root, split)
        except DataMissingError:
            if not download:
                raise
            download_dataset(info.name, root)
            x, y = loader(root, split)
    if limit and limit > 0:
        x, y = x[:limit], y[:limit]
    if x.shape[1:] != info.shape:
        raise DataFormatError(f"{info.name}: images have shape {x.shape[1:]}, expected {info.shape}")
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))


def make_loader(ds: TensorDataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      drop_last=drop_last)


# ---------------------------------------------------------------------------------------------- augmentation
AUGMENTATIONS = ("none", "flip", "crop_flip")


def augment_batch(x: torch.Tensor, kind: str, pad: int = 4) -> torch.Tensor:
    """Per-sample random augmentation of a batch with the global torch RNG (seeded by the training loop).

    ``kind`` (one of :data:`AUGMENTATIONS`, ``data:augment``, checked when the config is loaded): ``"none"``;
    ``"flip"`` (horizontal, p = 1/2); ``"crop_flip"``: zero-pad by ``pad`` and crop back at a random offset
    (torchvision's ``RandomCrop(size, padding=4)``) then flip, the CIFAR recipe of Cohen et al., CROWN-IBP, MACER
    and TRADES.
    """
    if kind == "none":
        return x
    b, _, h, w = x.shape
    if kind == "crop_flip":
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# ------------------------------------------------------------------------------------------------- download
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str | None) -> None:
    """Download ``url`` to ``dest`` through a temporary file renamed into place once complete and checked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.download")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        if md5 and _md5(tmp) != md5:
            raise DataFormatError(f"{url}: checksum mismatch (expected md5 {md5}): the download is damaged, "
                                  "try again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_error(name: str, url: str, root: Path, exc: OSError) -> DataMissingError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return DataMissingError(f"could not download {name} from {url} ({reason}) into {root}: check the network "
                            f"connection, or put the files there by hand")


def _unpack_cifar(archive: Path, root: Path) -> None:
    """Unpack the CIFAR-10 archive into a temporary folder in ``root``, then move the batch files that are not
    there yet into ``root/cifar-10-batches-py``: an interrupted unpacking leaves no truncated batch file."""
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-unpack-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(staging, filter="data")
            else:
                tar.extractall(staging)  # noqa: S202 - archive checked against its published md5
        final = root / "cifar-10-batches-py"
        final.mkdir(exist_ok=True)
        for f in (staging / "cifar-10-batches-py").iterdir():
            if not (final / f.name).exists():
                os.replace(f, final / f.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{archive}: cannot unpack ({exc}); delete it and download again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download a data set's original files into the data directory (only ever called on request)."""
    info = dataset_info(name)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if info.name == "mnist":
        for fname, md5 in MNIST_MD5.items():
            dest = root / "mnist" / fname
            if dest.is_file():
                continue
            for i, mirror in enumerate(MNIST_MIRRORS):
                try:
                    _fetch(mirror + fname, dest, md5)
                    break
                except OSError as exc:
                    if i == len(MNIST_MIRRORS) - 1:
                        raise _download_error("MNIST", mirror + fname, root, exc) from None
        return root / "mnist"
    if info.name == "cifar10":
        archive = root / "cifar-10-python.tar.gz"
        if not archive.is_file():
            try:
                _fetch(CIFAR_URL, archive, CIFAR_MD5)
            except OSError as exc:
                raise _download_error("CIFAR-10", CIFAR_URL, root, exc) from None
        _unpack_cifar(archive, root)
        return root / "cifar-10-batches-py"
    if info.name == "svhn":
        for split, md5 in SVHN_MD5.items():
            dest = root / "svhn" / f"{split}_32x32.mat"
            if not dest.is_file():
                try:
                    _fetch(SVHN_URL.format(split), dest, md5)
                except OSError as exc:
                    raise _download_error("SVHN", SVHN_URL.format(split), root, exc) from None
        return root / "svhn"
    raise ConfigError(f"{info.name} needs no download")

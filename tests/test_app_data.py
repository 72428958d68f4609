"""robustkern_cli.data: each loader on small files written here in the real formats, and the errors."""
import gzip
import pickle
import struct
import urllib.request

import numpy as np
import pytest
import scipy.io
import torch

from robustkern_cli.data import DATASETS, augment_batch, load_dataset, read_idx
from robustkern_cli.errors import DataFormatError, DataMissingError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)


def idx_bytes(arr: np.ndarray) -> bytes:
    """LeCun's IDX: 0, 0, type code 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=7, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, (img, lbl) in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                 ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for name, a in ((img, x), (lbl, y)):
            data = idx_bytes(a)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz, layout", [(False, "mnist"), (True, "MNIST/raw")])
def test_mnist_idx_plain_and_gzipped(tmp_path, gz, layout):
    arrays = write_mnist(tmp_path / layout, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split, tmp_path)
        x, y = ds.tensors
        want_x, want_y = arrays[split]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(want_y), 1, 28, 28)
        assert torch.equal(x[:, 0], torch.from_numpy(want_x.astype(np.float32) / 255.0))
        assert torch.equal(y, torch.from_numpy(want_y.astype(np.int64)))
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_idx_header_checks(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "good").write_bytes(idx_bytes(good))
    assert np.array_equal(read_idx(tmp_path / "good"), good)
    (tmp_path / "magic").write_bytes(b"\x01\x02" + idx_bytes(good)[2:])
    with pytest.raises(DataFormatError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(idx_bytes(good)[:-3])
    with pytest.raises(DataFormatError, match=r"header says \(2, 3, 4\)"):
        read_idx(tmp_path / "short")


def test_mnist_labels_must_match_images(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataFormatError, match="disagree"):
        load_dataset("mnist", "train", tmp_path)


def write_cifar(folder, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:  # the original batches are protocol-2 pickles with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        out[name] = (data, labels)
    return out


def test_cifar10_pickle_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    x, y = load_dataset("cifar10", "train", tmp_path).tensors
    assert x.shape == (15, 3, 32, 32) and y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    data2 = batches["data_batch_2"][0]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(x[3, 1], torch.from_numpy(data2[0, 1024:2048].reshape(32, 32).astype(np.float32) / 255))
    xt, yt = load_dataset("cifar", "test", tmp_path, limit=2).tensors  # alias and limit
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == batches["test_batch"][1][:2]


def test_cifar10_bad_pickle(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataFormatError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)


def test_svhn_mat_files(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 4), ("test", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [3], [1], [7]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / "svhn" / f"{split}_32x32.mat", {"X": X, "y": y})
        xs, ys = load_dataset("svhn", split, tmp_path).tensors
        assert xs.shape == (n, 3, 32, 32)
        assert ys.tolist() == [0, 3, 1, 7][:n]  # label 10 is digit 0
        assert torch.equal(xs[n - 1, 2], torch.from_numpy(X[:, :, 2, n - 1].astype(np.float32) / 255))


@pytest.mark.parametrize("name, files", [
    ("mnist", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]),
    ("cifar10", ["data_batch_1", "data_batch_5"]),
    ("svhn", ["train_32x32.mat"]),
])
def test_missing_files_error_names_files_and_folders(tmp_path, name, files):
    with pytest.raises(DataMissingError) as exc:
        load_dataset(name, "train", tmp_path)
    msg = str(exc.value)
    for f in files:
        assert f in msg
    assert str(tmp_path) in msg and "--download" in msg and "ROBUSTKERN_DATA" in msg


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist", n_test=2)
    monkeypatch.setenv("ROBUSTKERN_DATA", str(tmp_path))
    assert len(load_dataset("mnist", "test")) == 2


def test_digits_fixed_split_in_unit_range():
    xtr, ytr = load_dataset("digits", "train").tensors
    xte, yte = load_dataset("digits", "test").tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and 0.0 == xtr.min() and xtr.max() == 1.0
    assert torch.equal(load_dataset("digits", "test").tensors[0], xte)  # the split is fixed
    assert set(torch.bincount(yte).tolist()) <= {35, 36, 37}  # stratified: about 36 of each class
    info = DATASETS["digits"]
    assert xtr.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert xtr.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_augment_crop_flip_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    out = augment_batch(x, "crop_flip", pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    flipped = augment_batch(x, "flip")
    assert all(torch.equal(f, s) or torch.equal(f, s.flip(2)) for f, s in zip(flipped, x))
    assert augment_batch(x, "none") is x

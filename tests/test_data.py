"""Dataset readers on generated files in the exact formats, every bad-input case, and the real files."""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from robusttrain import data
from robusttrain.data import (
    DatasetError,
    FashionMNISTDataModule,
    ImageDataModule,
    download,
    load_arrays,
    random_crop_flip,
    read_cifar_bin,
    read_cifar_python,
    read_idx,
)


# ----- writers for the genuine formats ---------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=60, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def cifar_records(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    pixels = rng.integers(0, 256, (n, 3072))
    return labels, pixels, np.concatenate([labels[:, None], pixels], 1).astype(np.uint8).tobytes()


# ----- IDX -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", ndim=3)
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, arrays["train-images-idx3-ubyte"])


def test_idx_bad_inputs_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28)))
    cases = {
        "truncated.gz": gzip.compress(good)[:-10],
        "magic": b"\x12\x34" + good[2:],
        "dtype": good[:2] + b"\x0d" + good[3:],
        "short": good[:-5],
    }
    messages = {"truncated.gz": "truncated or corrupt gzip", "magic": "not an IDX file",
                "dtype": "dtype code", "short": "truncated or corrupt"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DatasetError, match=messages[name]) as err:
            read_idx(path, ndim=3)
        assert str(path) in str(err.value)
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(3)))
    with pytest.raises(DatasetError, match="1 dimensions, expected 3"):
        read_idx(tmp_path / "labels", ndim=3)


def test_label_out_of_range_and_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(60, 11))))
    with pytest.raises(DatasetError, match="label 11 out of range") as err:
        load_arrays("mnist", tmp_path)
    assert "train-labels" in str(err.value)
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(7))))
    with pytest.raises(DatasetError, match="holds 20 images but"):
        load_arrays("mnist", tmp_path)


def test_missing_files_say_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(DatasetError) as err:
        load_arrays("mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and str(tmp_path / "MNIST/raw") in message
    assert "download=true" in message
    spec = data.DATASETS["fashion_mnist"]
    assert str(data.DEBIAN_FASHION_DIR) in str(spec.extra_dirs[0])
    monkeypatch.setitem(data.DATASETS, "fashion_mnist",
                        data.DatasetSpec(**{**spec.__dict__, "extra_dirs": ()}))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_arrays("fashion_mnist", tmp_path)


@pytest.mark.parametrize("layout", ["", "MNIST/raw"])
def test_flat_and_torchvision_layouts(tmp_path, layout):
    write_idx_set(tmp_path / layout, gz=layout == "")
    arrays = load_arrays("mnist", tmp_path)
    assert arrays["train_x"].shape == (60, 1, 28, 28)
    assert arrays["test_y"].shape == (20,)


# ----- CIFAR-10 --------------------------------------------------------------------------------
def test_cifar_binary_roundtrip_and_errors(tmp_path):
    labels, pixels, raw = cifar_records(7)
    (tmp_path / "b.bin").write_bytes(raw)
    x, y = read_cifar_bin(tmp_path / "b.bin")
    assert x.shape == (7, 3, 32, 32) and np.array_equal(y, labels)
    assert np.array_equal(x.reshape(7, -1), pixels)  # channel-major, row-major: as stored
    (tmp_path / "short.bin").write_bytes(raw[:-1])
    with pytest.raises(DatasetError, match="whole number of 3073-byte") as err:
        read_cifar_bin(tmp_path / "short.bin")
    assert "short.bin" in str(err.value)
    bad = bytearray(raw)
    bad[0] = 10
    (tmp_path / "label.bin").write_bytes(bytes(bad))
    with pytest.raises(DatasetError, match="label 10 out of range"):
        read_cifar_bin(tmp_path / "label.bin")


def test_cifar_python_batches_are_read_without_running_code(tmp_path):
    labels, pixels, _ = cifar_records(5)
    batch = {b"data": pixels.astype(np.uint8), b"labels": labels.tolist(), b"batch_label": b"x"}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    x, y = read_cifar_python(tmp_path / "data_batch_1")
    assert x.shape == (5, 3, 32, 32) and np.array_equal(y, labels)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load") as err:
        read_cifar_python(tmp_path / "evil")
    assert "evil" in str(err.value)
    assert not marker.exists()


def test_cifar_layouts_binary_and_python(tmp_path):
    binary = tmp_path / "a" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for i in range(1, 6):
        (binary / f"data_batch_{i}.bin").write_bytes(cifar_records(4, seed=i)[2])
    (binary / "test_batch.bin").write_bytes(cifar_records(3)[2])
    arrays = load_arrays("cifar10", tmp_path / "a")
    assert arrays["train_x"].shape == (20, 3, 32, 32) and arrays["test_x"].shape == (3, 3, 32, 32)
    python = tmp_path / "b" / "cifar-10-batches-py"
    python.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        labels, pixels, _ = cifar_records(n)
        (python / name).write_bytes(pickle.dumps({b"data": pixels.astype(np.uint8),
                                                  b"labels": labels.tolist()}))
    assert load_arrays("cifar10", tmp_path / "b")["train_y"].shape == (20,)
    with pytest.raises(DatasetError, match="cifar10 files not found"):
        load_arrays("cifar10", tmp_path / "c")


# ----- download --------------------------------------------------------------------------------
class FakeOpener:
    """Serves bytes from memory in place of the network, recording the URLs asked for."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.urls = files, []

    def __call__(self, url):
        self.urls.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in self.files:
            raise OSError("404")
        return io.BytesIO(self.files[name])


def test_download_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    payloads = {}
    spec = data.DATASETS["mnist"]
    write_idx_set(tmp_path / "src")
    for stem in spec.files.values():
        payloads[stem + ".gz"] = (tmp_path / "src" / (stem + ".gz")).read_bytes()
    fake_md5 = {name: hashlib.md5(b).hexdigest() for name, b in payloads.items()}
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetSpec(**{**spec.__dict__,
                                                                   "md5": fake_md5}))
    opener = FakeOpener(payloads)
    folder = download("mnist", tmp_path / "data", opener=opener)
    assert folder == tmp_path / "data" / "MNIST" / "raw"
    assert all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in opener.urls)
    assert load_arrays("mnist", tmp_path / "data")["train_x"].shape == (60, 1, 28, 28)

    # a corrupted payload on every mirror: a clear error and no file left behind
    bad = dict(payloads)
    bad["t10k-labels-idx1-ubyte.gz"] = b"garbage"
    target = tmp_path / "data2"
    with pytest.raises(DatasetError, match="does not match the published"):
        download("mnist", target, opener=FakeOpener(bad))
    leftovers = list((target / "MNIST" / "raw").iterdir())
    assert not any("t10k-labels" in p.name for p in leftovers)


def test_download_cifar_extracts_only_the_batch_files(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names + ["../../escape.bin"]:
            content = cifar_records(2)[2]
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}" if "/" not in name else name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    archive = buf.getvalue()
    spec = data.DATASETS["cifar10"]
    monkeypatch.setitem(data.DATASETS, "cifar10", data.DatasetSpec(
        **{**spec.__dict__, "md5": {"cifar-10-binary.tar.gz": hashlib.md5(archive).hexdigest()}}))
    folder = download("cifar10", tmp_path / "d", opener=FakeOpener(
        {"cifar-10-binary.tar.gz": archive}))
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "d" / "escape.bin").exists()


# ----- the DataModule --------------------------------------------------------------------------
def small_module(tmp_path, **kw):
    write_idx_set(tmp_path, n_train=100, n_test=30)
    return ImageDataModule("mnist", data_dir=str(tmp_path), val_size=20, **kw)


def test_split_sizes_disjoint_and_seeded(tmp_path):
    dm = small_module(tmp_path)
    dm.setup()
    assert (len(dm.train_y), len(dm.val_y), len(dm.test_y)) == (80, 20, 30)
    train_rows = {tuple(r.flatten().tolist()[:50]) for r in dm.train_x}
    assert not any(tuple(r.flatten().tolist()[:50]) in train_rows for r in dm.val_x)
    again = ImageDataModule("mnist", data_dir=str(tmp_path), val_size=20)
    again.setup()
    other = ImageDataModule("mnist", data_dir=str(tmp_path), val_size=20, split_seed=1)
    other.setup()
    assert torch.equal(again.val_x, dm.val_x)
    assert not torch.equal(other.val_x, dm.val_x)
    sub = ImageDataModule("mnist", data_dir=str(tmp_path), val_size=20, train_subset=10)
    sub.setup()
    assert torch.equal(sub.train_x, dm.train_x[:10])


def test_loaders_give_whole_batches_and_shuffle_by_epoch(tmp_path):
    dm = small_module(tmp_path, batch_size=32, eval_batch_size=25)
    dm.setup()
    loader = dm.train_dataloader()
    shapes = [x.shape for x, _ in loader]
    assert shapes == [(32, 1, 28, 28), (32, 1, 28, 28), (16, 1, 28, 28)]
    first = torch.cat([y for _, y in loader])
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in loader]))
    assert [len(y) for _, y in dm.val_dataloader()] == [20]
    assert [len(y) for _, y in dm.test_dataloader()] == [25, 5]


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        ImageDataModule("svhn")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ImageDataModule("mnist", batch_size=0)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), val_size=1000)
    write_idx_set(tmp_path)
    with pytest.raises(ValueError, match="lower val_size"):
        dm.setup()


def test_augmentation_keeps_shapes_and_content():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, generator=g)
    assert out.shape == x.shape
    # every output pixel is either padding (0) or a pixel of the same image and channel
    for i in range(2):
        for c in range(3):
            src = set(x[i, c].flatten().tolist()) | {0.0}
            assert set(out[i, c].flatten().tolist()) <= src


# ----- the real files --------------------------------------------------------------------------
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_real_mnist(mnist_dir):
    arrays = load_arrays("mnist", mnist_dir)
    assert arrays["train_x"].shape == (60000, 1, 28, 28)
    assert arrays["test_x"].shape == (10000, 1, 28, 28)
    assert np.bincount(arrays["train_y"]).tolist() == MNIST_TRAIN_COUNTS
    for name, md5 in data.DATASETS["mnist"].md5.items():
        assert hashlib.md5((mnist_dir / "MNIST" / "raw" / name).read_bytes()).hexdigest() == md5


def test_real_cifar10(cifar10_dir):
    arrays = load_arrays("cifar10", cifar10_dir)
    assert arrays["train_x"].shape == (50000, 3, 32, 32)
    assert arrays["test_x"].shape == (10000, 3, 32, 32)
    assert np.bincount(arrays["train_y"]).tolist() == [5000] * 10
    assert np.bincount(arrays["test_y"]).tolist() == [1000] * 10


def test_real_fashion_mnist_and_normalization(fashion_dir):
    arrays = load_arrays("fashion_mnist", fashion_dir)
    assert arrays["train_x"].shape == (60000, 1, 28, 28)
    assert np.bincount(arrays["train_y"]).tolist() == [6000] * 10
    # the stored constants are the training set's pixel mean/std (to the 4 digits stored)
    pixels = arrays["train_x"].astype(np.float64) / 255
    spec = data.DATASETS["fashion_mnist"]
    assert pixels.mean() == pytest.approx(spec.mean[0], abs=1e-4)
    assert pixels.std() == pytest.approx(spec.std[0], abs=1e-4)
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir))
    dm.setup()
    # 55,000 normalized training images: mean 0 and std 1 up to the constants' rounding and the
    # 5,000 images held out for validation (a ~1e-3 effect)
    assert abs(dm.train_x.mean().item()) < 5e-3 and abs(dm.train_x.std().item() - 1) < 5e-3


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_normalization_constants_match_the_real_training_files(dataset, data_roots):
    root = data_roots[dataset]
    if root is None:
        pytest.skip(f"{dataset} files not found (set ROBUSTTRAIN_TEST_DATA)")
    x = load_arrays(dataset, root)["train_x"].astype(np.float64) / 255
    spec = data.DATASETS[dataset]
    assert x.mean(axis=(0, 2, 3)) == pytest.approx(spec.mean, abs=1e-4)
    assert x.std(axis=(0, 2, 3)) == pytest.approx(spec.std, abs=1e-4)

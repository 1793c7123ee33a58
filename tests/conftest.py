"""Shared fixtures: where the real datasets are, for the tests that need them, and a tiny fake one.

MNIST and CIFAR-10 are looked for in ``$ROBUSTTRAIN_TEST_DATA`` (CI points it at its copy), else in a
``shared/data`` folder beside the checkout; Fashion-MNIST there too or in Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). A test that needs a dataset
that is absent skips and says which, and how to get it.
"""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robusttrain.data import DEBIAN_FASHION_DIR, load_arrays


def _test_data_dir() -> Path:
    env = os.environ.get("ROBUSTTRAIN_TEST_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _roots() -> dict[str, Path | None]:
    base = _test_data_dir()
    mnist = base if (base / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file() else None
    cifar = base if (base / "cifar-10-batches-bin" / "test_batch.bin").is_file() else None
    fashion = None
    for folder in (base / "FashionMNIST" / "raw", DEBIAN_FASHION_DIR):
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            fashion = folder
            break
    return {"mnist": mnist, "fashion_mnist": fashion, "cifar10": cifar}


@pytest.fixture(scope="session")
def data_roots() -> dict[str, Path | None]:
    """``data_dir`` to pass for each dataset, or None where its files are absent."""
    return _roots()


_HINTS = {
    "mnist": "set ROBUSTTRAIN_TEST_DATA to a folder holding MNIST/raw/",
    "cifar10": "set ROBUSTTRAIN_TEST_DATA to a folder holding cifar-10-batches-bin/",
    "fashion_mnist": "apt-get install dataset-fashion-mnist, or set ROBUSTTRAIN_TEST_DATA to a "
                     "folder holding FashionMNIST/raw/",
}


def _root_or_skip(name: str) -> Path:
    root = _roots()[name]
    if root is None:
        pytest.skip(f"{name} files not found: {_HINTS[name]}")
    return root


@pytest.fixture(scope="session")
def require_data():
    """``require_data(dataset)`` -> its ``data_dir``, or skip saying how to get the files."""
    return _root_or_skip


def _require(name: str):
    @pytest.fixture(scope="session")
    def fixture() -> Path:
        return _root_or_skip(name)

    return fixture


mnist_dir = _require("mnist")
cifar10_dir = _require("cifar10")
fashion_dir = _require("fashion_mnist")


@pytest.fixture(scope="session")
def real_arrays():
    """``load(dataset)`` -> the dataset's raw arrays, read once per test session (or skip)."""
    cache: dict[str, dict] = {}

    def load(dataset: str) -> dict:
        root = _root_or_skip(dataset)
        if dataset not in cache:
            cache[dataset] = load_arrays(dataset, root)
        return cache[dataset]

    return load


def _idx(array: np.ndarray) -> bytes:
    """IDX: magic 0x0000 0x08 ndim, one big-endian uint32 per dimension, the uint8 data."""
    shape = b"".join(struct.pack(">I", n) for n in array.shape)
    return bytes([0, 0, 0x08, array.ndim]) + shape + array.astype(np.uint8).tobytes()


def _write_tiny_mnist(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 64), ("t10k", 16)]:
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    return folder


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A folder holding a valid MNIST-format dataset of 64 training and 16 test images of noise.

    For tests of the command line that need a dataset but not a real one; pass
    ``--data.init_args.val_size 16`` or less with it.
    """
    return _write_tiny_mnist(tmp_path / "tiny_mnist")


@pytest.fixture(scope="module")
def tiny_mnist_module(tmp_path_factory) -> Path:
    """The :func:`tiny_mnist` folder once per test module, for module-scoped fixtures (a model
    trained once); tests must not change its files."""
    return _write_tiny_mnist(tmp_path_factory.mktemp("data") / "tiny_mnist")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors (use with ``pytestmark`` or autouse).

    Threads only add synchronisation to every call on tensors this small (on a busy 2-core machine
    a 64×8 forward pass went from 0.2 ms to 20 ms with two threads).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

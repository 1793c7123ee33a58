"""Shared fixtures: where the real datasets are, for the tests that need them.

MNIST and CIFAR-10 are looked for in ``$ROBUSTTRAIN_TEST_DATA`` (CI points it at its copy), else in a
``shared/data`` folder beside the checkout; Fashion-MNIST in Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). A test that needs a dataset
that is absent skips and says which.
"""

import os
from pathlib import Path

import pytest

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
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
}


def _require(name: str):
    @pytest.fixture(scope="session")
    def fixture() -> Path:
        root = _roots()[name]
        if root is None:
            pytest.skip(f"{name} files not found: {_HINTS[name]}")
        return root

    return fixture


mnist_dir = _require("mnist")
cifar10_dir = _require("cifar10")
fashion_dir = _require("fashion_mnist")


@pytest.fixture(scope="session")
def real_arrays():
    """``load(dataset)`` -> the dataset's raw arrays, read once per test session (or skip)."""
    cache: dict[str, dict] = {}

    def load(dataset: str) -> dict:
        root = _roots()[dataset]
        if root is None:
            pytest.skip(f"{dataset} files not found: {_HINTS[dataset]}")
        if dataset not in cache:
            cache[dataset] = load_arrays(dataset, root)
        return cache[dataset]

    return load

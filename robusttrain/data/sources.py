"""Where the dataset files are: the dataset table, finding files, checksums and downloads.

Files are looked for in ``data_dir`` (default ``$ROBUSTTRAIN_DATA_DIR`` or ``./data``), flat or in
torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-bin/``,
``cifar-10-batches-py/``), and for Fashion-MNIST also in Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``). ``download=True``
fetches the official files and checks their published md5 sums, writing each atomically.

Local files are checked by structure (magic, shape, record size, label range; see
:mod:`robusttrain.data.formats`). A file as large as an official MNIST or CIFAR-10 binary file must
also have the official content (md5 below): MNIST and Fashion-MNIST share their file names, and this
catches one put in the other's place as well as flipped bytes that the structure checks cannot see.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robusttrain.data.formats import (
    DatasetError,
    check_labels,
    parse_cifar_bin,
    parse_idx,
    read_bytes,
    read_cifar_python,
)
from robusttrain.files import write_atomic

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_DIR",
    "DatasetSpec",
    "dataset_spec",
    "default_data_dir",
    "download",
    "load_arrays",
]

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is made of, where its official files live and how to normalize it.

    Attributes:
        name: the dataset's key in :data:`DATASETS`.
        title: the dataset's usual spelling, for messages.
        folders: torchvision-style sub-folders of ``data_dir``, tried after ``data_dir`` itself.
        files: role (``train_images`` ...) -> file name without ``.gz`` (IDX datasets).
        md5: file name as distributed -> its published md5 (checked on download).
        content_md5: file name without ``.gz`` -> (byte length, md5) of the official uncompressed
            content; a local file of that length must have that md5.
        mirrors: base URLs tried in order.
        input_shape: (C, H, W) of one image.
        mean, std: per-channel mean and standard deviation of the training pixels scaled to [0, 1].
        class_names: names of the labels 0..9.
        extra_dirs: further folders searched after ``data_dir`` (system-wide installs).
        get_hint: how to get the files, for the "not found" message.
    """

    name: str
    title: str
    folders: tuple[str, ...]
    files: dict[str, str]
    md5: dict[str, str]
    mirrors: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    content_md5: dict[str, tuple[int, str]] = field(default_factory=dict)
    extra_dirs: tuple[Path, ...] = ()
    get_hint: str = ""


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Normalization constants: mean and std (population, over all pixels of all training images, per
# channel) of the training pixels scaled to [0, 1], computed from the official training files and
# rounded to 4 digits; tests/test_data.py recomputes them from the real files.
#   MNIST          mean 0.1307                     std 0.3081
#   Fashion-MNIST  mean 0.2860                     std 0.3530
#   CIFAR-10       mean (0.4914, 0.4822, 0.4465)   std (0.2470, 0.2435, 0.2616)
# content_md5 sums were computed from the real files, whose distributed form matches the published
# md5 (MNIST .gz files, CIFAR-10 .bin files). Fashion-MNIST has none: the only copy at hand is
# Debian's repack, which cannot be checked against the published sums.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        folders=("MNIST/raw", "mnist"),
        files=_IDX_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        content_md5={
            "train-images-idx3-ubyte": (47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
            "train-labels-idx1-ubyte": (60_008, "a25bea736e30d166cdddb491f175f624"),
            "t10k-images-idx3-ubyte": (7_840_016, "2646ac647ad5339dbf082846283269ea"),
            "t10k-labels-idx1-ubyte": (10_008, "27ae3e4e09519cfbb04c329615203637"),
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(i) for i in range(10)),
        get_hint="pass download=true (--data.init_args.download true) or set data_dir to the "
        "folder holding them",
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        title="Fashion-MNIST",
        folders=("FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
        files=_IDX_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        input_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
        extra_dirs=(DEBIAN_FASHION_DIR,),
        get_hint="run `apt-get install dataset-fashion-mnist`, pass download=true "
        "(--data.init_args.download true) or set data_dir to the folder holding them",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10",
        folders=("cifar-10-batches-bin", "cifar-10-batches-py"),
        files={},  # two layouts, see _CIFAR_BIN and _CIFAR_PY
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        content_md5={
            "data_batch_1.bin": (30_730_000, "5dd7e06a14cb22eb9f671a540d1b7c25"),
            "data_batch_2.bin": (30_730_000, "5ea93a67294ea407fff1d09f752e9692"),
            "data_batch_3.bin": (30_730_000, "942cd6a4bcdd0dd3c604fbe906cb4421"),
            "data_batch_4.bin": (30_730_000, "ae636b3ba5c66a11e91e8cb52e771fcb"),
            "data_batch_5.bin": (30_730_000, "53f37980c15c3d472c316c40844f3f0d"),
            "test_batch.bin": (30_730_000, "803d5f7f4d78ea53de84dbe85f74fb6d"),
        },
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
        get_hint="pass download=true (--data.init_args.download true) or set data_dir to the "
        "folder holding cifar-10-batches-bin/",
    ),
}

_CIFAR_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin"
_CIFAR_PY = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
_CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"


def dataset_spec(dataset: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``dataset``; a ValueError lists the known ones."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_official_content(path: Path, data: bytes, dataset: str, key: str) -> None:
    """A file as long as an official one must be that file (see the module docstring)."""
    own = DATASETS[dataset]
    expected = own.content_md5.get(key)
    if expected is not None and len(data) == expected[0]:
        md5 = _md5(data)
        if md5 != expected[1]:
            raise DatasetError(
                f"{path}: content md5 {md5} differs from the official {own.title} file's "
                f"{expected[1]}; the file is corrupt or belongs to another dataset (MNIST and "
                f"Fashion-MNIST share file names). Delete it and get it again ({own.get_hint})"
            )
        return
    for other in DATASETS.values():
        theirs = other.content_md5.get(key)
        if other.name != dataset and theirs and len(data) == theirs[0] and _md5(data) == theirs[1]:
            raise DatasetError(
                f"{path} is the official {other.title} file, not {own.title}; point data_dir "
                f"at the {own.title} files ({own.get_hint})"
            )


# ----- finding files ---------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``$ROBUSTTRAIN_DATA_DIR`` when set and non-empty, else ``./data``."""
    return Path(os.environ.get("ROBUSTTRAIN_DATA_DIR") or "data")


def _candidate_dirs(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    return list(dict.fromkeys([data_dir, *(data_dir / f for f in spec.folders), *spec.extra_dirs]))


def _find_idx(spec: DatasetSpec, data_dir: Path) -> dict[str, Path]:
    searched = []
    for folder in _candidate_dirs(spec, data_dir):
        found = {}
        for role, stem in spec.files.items():
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found[role] = folder / name
                    break
        if len(found) == len(spec.files):
            return found
        missing = [stem for role, stem in spec.files.items() if role not in found]
        searched.append(f"{folder} (lacks {', '.join(missing)})" if found else str(folder))
    names = ", ".join(f"{stem}[.gz]" for stem in spec.files.values())
    raise DatasetError(
        f"{spec.title} files not found: looked for {names} in " + "; ".join(searched)
        + f". To get them: {spec.get_hint}"
    )


def _find_cifar(spec: DatasetSpec, data_dir: Path) -> tuple[str, list[Path], Path]:
    searched = []
    for kind, (train, test) in (("bin", _CIFAR_BIN), ("py", _CIFAR_PY)):
        for folder in (data_dir, data_dir / f"cifar-10-batches-{kind}"):
            searched.append(str(folder))
            paths = [folder / n for n in train]
            if all(p.is_file() for p in paths) and (folder / test).is_file():
                return kind, paths, folder / test
    raise DatasetError(
        "CIFAR-10 files not found: looked for data_batch_1..5.bin and test_batch.bin (binary "
        "version) or data_batch_1..5 and test_batch (python version) in "
        + ", ".join(dict.fromkeys(searched)) + f". To get them: {spec.get_hint}"
    )


def _load_cifar_file(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "py":
        return read_cifar_python(path)
    data = read_bytes(path)
    _check_official_content(path, data, "cifar10", path.name)
    return parse_cifar_bin(path, data)


def _load_idx_file(path: Path, stem: str, ndim: int, dataset: str) -> np.ndarray:
    data = read_bytes(path)
    _check_official_content(path, data, dataset, stem)
    return parse_idx(path, data, ndim)


def load_arrays(dataset: str, data_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Find and read a dataset's official train and test files.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: where to look (see the module docstring); default :func:`default_data_dir`.

    Returns:
        uint8 arrays ``train_x`` (N, C, H, W), ``train_y`` (N,), ``test_x``, ``test_y``.

    Raises:
        DatasetError: files missing (the message lists every folder searched and how to get them)
            or unusable (the message names the file).
    """
    spec = dataset_spec(dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if dataset == "cifar10":
        kind, train_paths, test_path = _find_cifar(spec, data_dir)
        parts = [_load_cifar_file(p, kind) for p in train_paths]
        test_x, test_y = _load_cifar_file(test_path, kind)
        return {
            "train_x": np.concatenate([x for x, _ in parts]),
            "train_y": np.concatenate([y for _, y in parts]),
            "test_x": test_x,
            "test_y": test_y,
        }
    paths = _find_idx(spec, data_dir)
    arrays = {}
    for split in ("train", "test"):
        image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = _load_idx_file(image_path, spec.files[f"{split}_images"], 3, dataset)
        labels = _load_idx_file(label_path, spec.files[f"{split}_labels"], 1, dataset)
        check_labels(labels, label_path)
        if images.shape[1:] != (28, 28):
            raise DatasetError(f"{image_path}: images of shape {images.shape[1:]}, expected "
                               "28x28; this is not an MNIST-style image file")
        if len(images) != len(labels):
            raise DatasetError(
                f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
                "labels; the two files do not belong together, get both again"
            )
        arrays[f"{split}_x"] = images[:, None]
        arrays[f"{split}_y"] = labels
    return arrays


# ----- downloading -----------------------------------------------------------------------------
def _urlopen(url: str) -> Any:
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def _fetch(name: str, spec: DatasetSpec, target: Path, opener: Callable[[str], Any]) -> None:
    """Stream ``name`` from the first mirror serving the published md5 into ``target``.

    The bytes go to a temporary file beside ``target`` while their md5 is computed; only a file
    with the published md5 is renamed into place, anything else is deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in spec.mirrors:
        url = mirror + name
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, opener(url) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != spec.md5[name]:
                errors.append(f"{url}: md5 {digest.hexdigest()} does not match the published "
                              f"{spec.md5[name]}")
                continue
            os.replace(tmp, target)
            return
        except (OSError, http.client.HTTPException) as err:
            errors.append(f"{url}: {err}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise DatasetError(
        f"could not download {target}: " + "; ".join(errors)
        + f". Try again later, or put the official {name} into {target.parent} by hand"
    )


def download(
    dataset: str,
    data_dir: str | Path | None = None,
    opener: Callable[[str], Any] | None = None,
) -> Path:
    """Fetch a dataset's official files into ``data_dir`` (torchvision layout), md5-checked.

    Nothing is fetched when the files are already found (see :func:`load_arrays`, Debian's
    Fashion-MNIST included). Each file is streamed to a temporary file in its destination folder
    and renamed into place only when its md5 equals the published one, so an interrupted or
    corrupted download leaves nothing half-written. The CIFAR-10 archive is extracted by name:
    only the six known batch files are written, never a path taken from the archive.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: destination; default :func:`default_data_dir`.
        opener: ``url -> file-like context manager``; default ``urllib.request.urlopen`` with a
            timeout of ``DOWNLOAD_TIMEOUT_S`` seconds.

    Returns:
        The folder holding the files.

    Raises:
        DatasetError: no mirror served the file with the published md5.
    """
    spec = dataset_spec(dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    opener = opener or _urlopen
    if dataset == "cifar10":
        try:
            return _find_cifar(spec, data_dir)[2].parent
        except DatasetError:
            pass
        target = data_dir / "cifar-10-batches-bin"
        archive = data_dir / _CIFAR_ARCHIVE
        if not (archive.is_file() and _md5(archive.read_bytes()) == spec.md5[_CIFAR_ARCHIVE]):
            _fetch(_CIFAR_ARCHIVE, spec, archive, opener)
        wanted = {*_CIFAR_BIN[0], _CIFAR_BIN[1]}
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                for member in tar.getmembers():
                    name = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and name in wanted:
                        data = tar.extractfile(member)
                        assert data is not None  # extractfile gives None only for non-files
                        write_atomic(target / name, data.read())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DatasetError(f"{archive}: unreadable archive ({err}); delete it and retry") from None
        absent = sorted(n for n in wanted if not (target / n).is_file())
        if absent:
            raise DatasetError(f"{archive} lacks {', '.join(absent)}; delete it and retry")
        archive.unlink()
        return target
    try:
        return next(iter(_find_idx(spec, data_dir).values())).parent
    except DatasetError:
        pass
    target = data_dir / spec.folders[0]
    for stem in spec.files.values():
        if not ((target / (stem + ".gz")).is_file() or (target / stem).is_file()):
            _fetch(stem + ".gz", spec, target / (stem + ".gz"), opener)
    return target


"""Dataset files and LightningDataModules for MNIST, Fashion-MNIST and CIFAR-10.

The genuine on-disk formats are read directly (no torchvision):

* IDX, gzipped or not (MNIST, Fashion-MNIST): a 4-byte magic (two zero bytes, the dtype code 0x08
  for unsigned bytes, the number of dimensions: 0x00000801 for labels, 0x00000803 for images), one
  big-endian uint32 per dimension, then the data.
* CIFAR-10 "binary version" (``cifar-10-batches-bin/*.bin``): records of 1 label byte and
  3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32×32).
* CIFAR-10 "python version" (``cifar-10-batches-py/``): pickled dicts, read with a restricted
  unpickler that only rebuilds numpy arrays and plain containers, so a file cannot run code.

Files are looked for in ``data_dir`` (default ``$ROBUSTTRAIN_DATA_DIR`` or ``./data``), flat or in
torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-bin/``,
``cifar-10-batches-py/``), and for Fashion-MNIST also in Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``). ``download=True``
fetches the official files and checks their published md5 sums, writing each atomically.

Local files are checked by structure (magic, shape, record size, label range). A file as large as
an official MNIST or CIFAR-10 binary file must also have the official content (md5 below): MNIST
and Fashion-MNIST share their file names, and this catches one put in the other's place as well as
flipped bytes that the structure checks cannot see.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from robusttrain.files import write_atomic

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "ImageDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "TensorBatches",
    "EpochShuffleSampler",
    "default_data_dir",
    "download",
    "load_arrays",
    "random_crop_flip",
    "read_cifar_bin",
    "read_cifar_python",
    "read_idx",
]

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 60.0


class DatasetError(ValueError):
    """A dataset file that is missing or unusable; the message names the file and the fix."""


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
_CIFAR_RECORD = 1 + 3 * 32 * 32
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ----- readers ---------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip (by its magic, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DatasetError(
            f"{path} is a truncated or corrupt gzip file ({err}); delete it and get it again"
        ) from None


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


def _parse_idx(path: Path, data: bytes, ndim: int | None) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{path} is not an IDX file (bad magic 0x{data[:4].hex()}, expected 0x00000801 for "
            "labels or 0x00000803 for images); get the file again"
        )
    if data[2] != 0x08:
        raise DatasetError(
            f"{path}: IDX dtype code 0x{data[2]:02x}, expected 0x08 (unsigned byte); "
            "this is not an MNIST-style file"
        )
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DatasetError(
            f"{path}: IDX magic 0x{int.from_bytes(data[:4], 'big'):08x} ({dims} dimensions), "
            f"expected 0x{_IDX_MAGIC.get(ndim, 0x800 + ndim):08x} ({ndim} dimensions); "
            "the image and label files may be swapped"
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header; the file is corrupt, get it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(data)} bytes; the file is truncated or corrupt, get it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a read-only uint8 array.

    Args:
        path: the file.
        ndim: the number of dimensions expected (1 for labels, magic 0x00000801; 3 for images,
            magic 0x00000803), or None to accept any.

    Returns:
        The array, of the shape the header declares.

    Raises:
        DatasetError: unreadable or corrupt gzip, wrong magic, dtype or number of dimensions, or a
            length that does not match the header.
    """
    path = Path(path)
    return _parse_idx(path, _read_bytes(path), ndim)


def _check_labels(labels: np.ndarray, path: Path, num_classes: int = 10) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DatasetError(
            f"{path}: label {bad} out of range 0..{num_classes - 1}; "
            "the file is corrupt or not a label file, get it again"
        )


def _parse_cifar_bin(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
            "records; the file is truncated or corrupt, get it again"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    _check_labels(labels, path)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch (records of 1 label byte + 3072 pixel bytes, CHW order).

    Args:
        path: a ``data_batch_<k>.bin`` or ``test_batch.bin`` file (gzipped or not).

    Returns:
        images (N, 3, 32, 32) uint8 and labels (N,) uint8.

    Raises:
        DatasetError: the size is not a positive multiple of 3073 bytes, or a label is not 0..9.
    """
    path = Path(path)
    return _parse_cifar_bin(path, _read_bytes(path))


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers only; any other global is refused.

    Dicts, lists, tuples, strings and numbers need no globals at all; numpy arrays need the array
    reconstructor (``_frombuffer`` at protocol 5), ``ndarray`` and ``dtype``; bytes pickled by
    Python 3 at protocol < 3 need ``_codecs.encode``. None of these can run code of the file's
    choosing.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_python(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch (python version) without letting the file run code.

    Args:
        path: a ``data_batch_<k>`` or ``test_batch`` file of ``cifar-10-batches-py/``.

    Returns:
        images (N, 3, 32, 32) uint8 and labels (N,) uint8.

    Raises:
        DatasetError: the pickle asks for anything but numpy arrays and plain containers, is
            corrupt, or lacks ``b"data"`` (N, 3072) / ``b"labels"`` (N values in 0..9).
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DatasetError(
            f"{path}: not a genuine CIFAR-10 python batch ({err}); delete it and get the "
            "official files again"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise DatasetError(
            f"{path}: corrupt pickle ({type(err).__name__}: {err}); get the file again"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (no b'data'/b'labels' entries)")
    images = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: b'labels' is not a list of integers") from None
    if (images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072
            or labels.ndim != 1 or len(labels) != len(images)):
        raise DatasetError(
            f"{path}: data of shape {images.shape} ({images.dtype}) with {labels.size} labels, "
            "expected uint8 (N, 3072) and N labels; the file is corrupt, get it again"
        )
    _check_labels(labels, path)
    return images.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


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
    data = _read_bytes(path)
    _check_official_content(path, data, "cifar10", path.name)
    return _parse_cifar_bin(path, data)


def _load_idx_file(path: Path, stem: str, ndim: int, dataset: str) -> np.ndarray:
    data = _read_bytes(path)
    _check_official_content(path, data, dataset, stem)
    return _parse_idx(path, data, ndim)


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
    spec = _spec(dataset)
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
        _check_labels(labels, label_path)
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
    spec = _spec(dataset)
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
                        write_atomic(target / name, tar.extractfile(member).read())
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


# ----- datasets and loaders --------------------------------------------------------------------
class TensorBatches(Dataset):
    """In-memory ``(x, y)`` tensors whose loader gathers a whole batch with one indexing op.

    ``DataLoader`` calls ``__getitems__`` with a batch's indices (from any sampler, Lightning's
    ``DistributedSampler`` included); with :func:`pass_batch` as ``collate_fn`` the batch is used
    as is, with no per-sample Python work.

    Args:
        x: inputs, first dimension the sample.
        y: targets, same length as ``x``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]


def pass_batch(batch: Any) -> Any:
    """``collate_fn`` for :class:`TensorBatches`: the batch is already collated."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(size)`` that is a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` at the start of every epoch (also through the
    ``DistributedSamplerWrapper`` it inserts under DDP), so a run resumed from a checkpoint sees
    the same batches as the uninterrupted run, and the global RNG is neither used nor reseeded.

    Args:
        size: number of samples.
        seed: base seed; epoch ``e`` uses a local generator seeded with ``seed * 1_000_003 + e``.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    fill: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with padding and random horizontal flip, drawn per image, for a whole batch.

    Output image ``i`` is ``P_i[:, dy_i : dy_i + H, dx_i : dx_i + W]``, mirrored left-right with
    probability 1/2, where ``P_i`` is image ``i`` padded by ``padding`` pixels of value ``fill``
    on every side and ``dy_i, dx_i`` are uniform on ``0..2*padding``. One gather, no Python loop
    over images; runs on ``x``'s device.

    Args:
        x: images (N, C, H, W).
        padding: pixels of padding on each side.
        fill: padding value, one for all channels or one per channel.
        generator: CPU generator for the offsets and flips; None uses the global RNG (the one
            ``seed_everything`` seeds).

    Returns:
        A new tensor of the shape of ``x``.
    """
    n, c, h, w = x.shape
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    fill_values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if fill_values.numel() not in (1, c):
        raise ValueError(f"fill has {fill_values.numel()} values for {c} channels")
    padded = fill_values.view(1, -1, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # mirrored reads
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]
    # flat index into each padded plane, shared by the channels: (N, H * W)
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w)
    out = padded.view(n, c, -1).gather(2, index.expand(n, c, h * w))
    return out.view(n, c, h, w)


class ImageDataModule(LightningDataModule):
    """A whole image-classification dataset in memory as normalized float32 tensors.

    Pixels are scaled to [0, 1] and normalized per channel, ``x = (pixel / 255 - mean) / std``,
    with the dataset's training-set constants (see :data:`DATASETS`). The validation split is
    carved from the official training set with a permutation drawn from a local generator seeded
    with ``split_seed``; the test split is the official test set. After :meth:`setup` the tensors
    are ``train_x, train_y, val_x, val_y, test_x, test_y`` (x: (N, C, H, W) float32, y: int64).

    Training batches are shuffled by :class:`EpochShuffleSampler`; evaluation loaders keep the
    order. With augmentation on, training batches get :func:`random_crop_flip` (4-pixel padding
    with black, i.e. ``-mean/std`` after normalization, as torchvision's ``RandomCrop`` before
    ``Normalize``) in ``on_after_batch_transfer``, on the device, while the trainer is training.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: where the files are (see the module docstring); default
            ``$ROBUSTTRAIN_DATA_DIR`` or ``./data``.
        batch_size: training batch size.
        eval_batch_size: batch size of the validation and test loaders.
        val_size: images moved from the training set to the validation set. 0 means no
            validation: ``val_x``/``val_y`` are empty and ``val_dataloader`` returns ``[]``, which
            Lightning treats as "skip validation" (the test set is never used in its place).
        split_seed: seed of the train/validation permutation and of the training shuffle.
        download: fetch the official files (md5-checked) in ``prepare_data`` when not found.
        augment: random crop with 4-pixel padding and horizontal flip on training batches;
            ``None`` means on for CIFAR-10, off otherwise.
        train_subset: keep only the first k images of the shuffled training part (all when k
            exceeds it), for quick runs.
        num_workers: DataLoader workers (the data is already in memory; 0 is usually fastest).
    """

    def __init__(
        self,
        dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "fashion_mnist",
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        download: bool = False,
        augment: bool | None = None,
        train_subset: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        spec = _spec(dataset)
        for name, value, low in [("batch_size", batch_size, 1),
                                 ("eval_batch_size", eval_batch_size, 1),
                                 ("val_size", val_size, 0), ("split_seed", split_seed, 0),
                                 ("num_workers", num_workers, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if train_subset is not None and (isinstance(train_subset, bool)
                                         or not isinstance(train_subset, int) or train_subset < 1):
            raise ValueError(f"train_subset must be null or an integer >= 1, got {train_subset!r}")
        if augment is not None and not isinstance(augment, bool):
            raise ValueError(f"augment must be true, false or null, got {augment!r}")
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path or null, got {data_dir!r}")
        # Saved explicitly (not from the caller's frame) so that subclasses record `dataset` too:
        # a checkpoint's datamodule hyperparameters rebuild an ImageDataModule as they are.
        self.save_hyperparameters(
            {"dataset": dataset, "data_dir": None if data_dir is None else str(data_dir),
             "batch_size": batch_size, "eval_batch_size": eval_batch_size, "val_size": val_size,
             "split_seed": split_seed, "download": bool(download), "augment": augment,
             "train_subset": train_subset, "num_workers": num_workers}
        )
        self.spec = spec
        self.num_classes = len(spec.class_names)
        self.input_shape = spec.input_shape
        self.class_names = spec.class_names
        self.augment = (dataset == "cifar10") if augment is None else augment
        self._ready = False

    def prepare_data(self) -> None:
        """Download the files when ``download`` is set and they are not found."""
        if self.hparams.download:
            download(self.hparams.dataset, self.hparams.data_dir)

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float32, ``(pixel / 255 - mean) / std``."""
        x = torch.from_numpy(np.ascontiguousarray(images).copy()).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def setup(self, stage: str | None = None) -> None:
        """Read the files and build the splits (once: later calls reuse the tensors)."""
        if self._ready:
            return
        arrays = load_arrays(self.hparams.dataset, self.hparams.data_dir)
        n_train = len(arrays["train_y"])
        val_size = self.hparams.val_size
        if val_size >= n_train:
            raise ValueError(f"val_size={val_size} leaves no training images (the training set "
                             f"has {n_train}); lower val_size")
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        perm = torch.randperm(n_train, generator=generator).numpy()
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        if self.hparams.train_subset is not None:
            train_idx = train_idx[: self.hparams.train_subset]
        # index the uint8 arrays first: only the kept images are converted to float
        self.train_x = self._to_tensor(arrays["train_x"][train_idx])
        self.train_y = torch.from_numpy(arrays["train_y"][train_idx].astype(np.int64))
        self.val_x = self._to_tensor(arrays["train_x"][val_idx])
        self.val_y = torch.from_numpy(arrays["train_y"][val_idx].astype(np.int64))
        self.test_x = self._to_tensor(arrays["test_x"])
        self.test_y = torch.from_numpy(arrays["test_y"].astype(np.int64))
        self._ready = True

    def _check_ready(self) -> None:
        if not self._ready:
            raise RuntimeError("call setup() before asking for a dataloader")

    def train_dataloader(self) -> DataLoader:
        self._check_ready()
        return DataLoader(
            TensorBatches(self.train_x, self.train_y),
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(self.train_y), self.hparams.split_seed),
            collate_fn=pass_batch,
            num_workers=self.hparams.num_workers,
            drop_last=False,
        )

    def _eval_loader(self, x: torch.Tensor, y: torch.Tensor) -> DataLoader:
        return DataLoader(
            TensorBatches(x, y),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            collate_fn=pass_batch,
            num_workers=self.hparams.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        self._check_ready()
        if self.hparams.val_size == 0:
            return []
        return self._eval_loader(self.val_x, self.val_y)

    def test_dataloader(self) -> DataLoader:
        self._check_ready()
        return self._eval_loader(self.test_x, self.test_y)

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The training augmentation: crop with 4 pixels of black padding, random flip."""
        black = [-m / s for m, s in zip(self.spec.mean, self.spec.std)]
        return random_crop_flip(x, padding=4, fill=black)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            x, y = batch
            return self.augment_batch(x), y
        return batch


class MNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for MNIST (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["mnist"].input_shape
    class_names = DATASETS["mnist"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("mnist", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers)


class FashionMNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for Fashion-MNIST (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["fashion_mnist"].input_shape
    class_names = DATASETS["fashion_mnist"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("fashion_mnist", data_dir, batch_size, eval_batch_size, val_size,
                         split_seed, download, augment, train_subset, num_workers)


class CIFAR10DataModule(ImageDataModule):
    """:class:`ImageDataModule` for CIFAR-10 (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["cifar10"].input_shape
    class_names = DATASETS["cifar10"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("cifar10", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers)

"""Dataset files and LightningDataModules for MNIST, Fashion-MNIST and CIFAR-10.

The genuine on-disk formats are read directly (no torchvision):

* IDX, gzipped or not (MNIST, Fashion-MNIST): a 4-byte magic (two zero bytes, the dtype code 0x08
  for uint8, the number of dimensions), one big-endian uint32 per dimension, then the data.
* CIFAR-10 "binary version" (``cifar-10-batches-bin/*.bin``): records of 1 label byte and
  3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32×32).
* CIFAR-10 "python version" (``cifar-10-batches-py/``): pickled dicts, read with a restricted
  unpickler that only rebuilds numpy arrays and plain containers, so a file cannot run code.

Files are looked for in ``data_dir`` (default ``$ROBUSTTRAIN_DATA_DIR`` or ``./data``), flat or in
torchvision's layout (``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-bin/``,
``cifar-10-batches-py/``), and for Fashion-MNIST also in Debian's
``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``). ``download=True``
fetches the official files and checks their published md5 sums, writing each atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "read_idx",
    "read_cifar_bin",
    "read_cifar_python",
    "load_arrays",
    "download",
]

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(ValueError):
    """A dataset file that is missing or unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is made of and where its official files live."""

    name: str
    folders: tuple[str, ...]  # torchvision-style sub-folders of data_dir, tried after data_dir
    files: dict[str, str]  # role -> file name
    md5: dict[str, str]  # file name -> published md5 (of the file as distributed)
    mirrors: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    extra_dirs: tuple[Path, ...] = ()
    get_hint: str = ""


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Normalization constants: mean and std of the training pixels scaled to [0, 1], computed from the
# official training files (tests/test_data.py recomputes them from the real files).
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folders=("MNIST/raw", "mnist"),
        files=_IDX_FILES,
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(i) for i in range(10)),
        get_hint="pass download=true (--data.init_args.download true) or set data_dir",
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
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
        "(--data.init_args.download true) or set data_dir",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        folders=("cifar-10-batches-bin", "cifar-10-batches-py"),
        files={},  # see _cifar_files
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
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
_CIFAR_RECORD = 1 + 3 * 32 * 32


# ----- readers ---------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip (by its magic, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DatasetError(
            f"{path} is a truncated or corrupt gzip file ({err}); delete it and get it again"
        ) from None


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a uint8 array.

    Args:
        path: the file.
        ndim: the number of dimensions expected (1 for labels, 3 for images), or None.

    Raises:
        DatasetError: wrong magic, dtype or dimensions, or a size that does not match the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    if data[2] != 0x08:
        raise DatasetError(f"{path}: IDX dtype code 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DatasetError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(data)} bytes; the file is truncated or corrupt, get it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _check_labels(labels: np.ndarray, path: Path, num_classes: int = 10) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"{path}: label {int(labels.max())} out of range 0..{num_classes - 1}; "
            "the file is corrupt or not a label file"
        )


def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: images (N, 3, 32, 32) uint8 and labels (N,) uint8."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
            "records; the file is truncated or corrupt, get it again"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    _check_labels(labels, path)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers only; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_python(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch (python version) without letting the file run code."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse is a corrupt file
        raise DatasetError(f"{path}: corrupt pickle ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (no b'data'/b'labels' entries)")
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3072 or len(labels) != len(images):
        raise DatasetError(f"{path}: data of shape {images.shape} with {len(labels)} labels, "
                           "expected (N, 3072) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: label out of range 0..9")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


# ----- finding files ---------------------------------------------------------------------------
def default_data_dir() -> Path:
    return Path(os.environ.get("ROBUSTTRAIN_DATA_DIR", "data"))


def _candidate_dirs(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    return [data_dir, *(data_dir / f for f in spec.folders), *spec.extra_dirs]


def _find_idx(spec: DatasetSpec, data_dir: Path) -> dict[str, Path]:
    searched = _candidate_dirs(spec, data_dir)
    for folder in searched:
        found = {}
        for role, stem in spec.files.items():
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found[role] = folder / name
                    break
        if len(found) == len(spec.files):
            return found
    names = ", ".join(f"{stem}[.gz]" for stem in spec.files.values())
    raise DatasetError(
        f"{spec.name} files not found: looked for {names} in "
        + ", ".join(str(d) for d in searched)
        + f". To get them: {spec.get_hint}"
    )


def _find_cifar(spec: DatasetSpec, data_dir: Path) -> tuple[str, list[Path], Path]:
    searched = []
    for kind, (train, test) in (("bin", _CIFAR_BIN), ("py", _CIFAR_PY)):
        for folder in (data_dir, data_dir / f"cifar-10-batches-{kind}"):
            searched.append(folder)
            paths = [folder / n for n in train]
            if all(p.is_file() for p in paths) and (folder / test).is_file():
                return kind, paths, folder / test
    raise DatasetError(
        "cifar10 files not found: looked for data_batch_1..5.bin and test_batch.bin (binary "
        "version) or data_batch_1..5 and test_batch (python version) in "
        + ", ".join(str(d) for d in dict.fromkeys(searched))
        + f". To get them: {spec.get_hint}"
    )


def load_arrays(dataset: str, data_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The raw uint8 arrays of a dataset: train_x (N, C, H, W), train_y, test_x, test_y."""
    spec = _spec(dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if dataset == "cifar10":
        kind, train_paths, test_path = _find_cifar(spec, data_dir)
        reader = read_cifar_bin if kind == "bin" else read_cifar_python
        parts = [reader(p) for p in train_paths]
        test_x, test_y = reader(test_path)
        return {
            "train_x": np.concatenate([x for x, _ in parts]),
            "train_y": np.concatenate([y for _, y in parts]),
            "test_x": test_x,
            "test_y": test_y,
        }
    paths = _find_idx(spec, data_dir)
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"], ndim=3)
        labels = read_idx(paths[f"{split}_labels"], ndim=1)
        _check_labels(labels, paths[f"{split}_labels"])
        if images.shape[1:] != (28, 28):
            raise DatasetError(f"{paths[f'{split}_images']}: images of shape {images.shape[1:]}, "
                               "expected 28x28")
        if len(images) != len(labels):
            raise DatasetError(
                f"{paths[f'{split}_images']} holds {len(images)} images but "
                f"{paths[f'{split}_labels']} holds {len(labels)} labels"
            )
        arrays[f"{split}_x"] = images[:, None]
        arrays[f"{split}_y"] = labels
    return arrays


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


# ----- downloading -----------------------------------------------------------------------------
def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch(name: str, spec: DatasetSpec, opener: Any) -> bytes:
    errors = []
    for mirror in spec.mirrors:
        url = mirror + name
        try:
            with opener(url) as response:
                data = response.read()
        except OSError as err:
            errors.append(f"{url}: {err}")
            continue
        if _md5(data) != spec.md5[name]:
            errors.append(f"{url}: md5 {_md5(data)} does not match the published {spec.md5[name]}")
            continue
        return data
    raise DatasetError(f"could not download {name}: " + "; ".join(errors))


def download(
    dataset: str, data_dir: str | Path | None = None, opener: Any = urllib.request.urlopen
) -> Path:
    """Fetch a dataset's official files into ``data_dir`` (torchvision layout), md5-checked.

    Files already present and readable are kept. Each file is written atomically, so an
    interrupted or failed download leaves nothing half-written.

    Returns:
        The folder holding the files.
    """
    spec = _spec(dataset)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if dataset == "cifar10":
        target = data_dir / "cifar-10-batches-bin"
        try:
            _find_cifar(spec, data_dir)
            return target
        except DatasetError:
            pass
        archive = _fetch("cifar-10-binary.tar.gz", spec, opener)
        wanted = {*_CIFAR_BIN[0], _CIFAR_BIN[1]}
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                # only the known batch files, written by name: no path from the archive is used
                if member.isfile() and name in wanted:
                    _write_atomic(target / name, tar.extractfile(member).read())
        return target
    target = data_dir / spec.folders[0]
    for stem in spec.files.values():
        if (target / (stem + ".gz")).is_file() or (target / stem).is_file():
            continue
        _write_atomic(target / (stem + ".gz"), _fetch(stem + ".gz", spec, opener))
    return target


# ----- datasets and loaders --------------------------------------------------------------------
class TensorBatches(Dataset):
    """In-memory (x, y) tensors whose loader gathers a whole batch with one indexing op."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]


def _pass_batch(batch: Any) -> Any:
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that is a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees the same batches as the uninterrupted run.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None):
    """Random crop (zero padding ``padding``) and horizontal flip, per image, for a whole batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class ImageDataModule(LightningDataModule):
    """A whole image-classification dataset in memory as normalized float tensors.

    The validation split is carved from the official training set with a fixed-seed permutation;
    the test split is the official test set.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: where the files are (see the module docstring); default
            ``$ROBUSTTRAIN_DATA_DIR`` or ``./data``.
        batch_size: training batch size.
        eval_batch_size: batch size of the validation and test loaders.
        val_size: images moved from the training set to the validation set (0: no validation).
        split_seed: seed of the train/validation permutation and of the training shuffle.
        download: fetch the official files (md5-checked) when they are not found.
        augment: random crop with 4-pixel padding and horizontal flip on training batches;
            ``None`` means on for CIFAR-10, off otherwise.
        train_subset: keep only the first k training images (after the split), for quick runs.
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
        for name, value, low in [("batch_size", batch_size, 1), ("eval_batch_size",
                                 eval_batch_size, 1), ("val_size", val_size, 0),
                                 ("num_workers", num_workers, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if train_subset is not None and (not isinstance(train_subset, int) or train_subset < 1):
            raise ValueError(f"train_subset must be null or an integer >= 1, got {train_subset!r}")
        # saved explicitly (not from the caller's frame) so subclasses record `dataset` too
        self.save_hyperparameters(
            {"dataset": dataset, "data_dir": data_dir, "batch_size": batch_size,
             "eval_batch_size": eval_batch_size, "val_size": val_size, "split_seed": split_seed,
             "download": download, "augment": augment, "train_subset": train_subset,
             "num_workers": num_workers}
        )
        self.spec = spec
        self.num_classes = len(spec.class_names)
        self.input_shape = spec.input_shape
        self.class_names = spec.class_names
        self.augment = (dataset == "cifar10") if augment is None else augment
        self._ready = False

    def prepare_data(self) -> None:
        if self.hparams.download:
            download(self.hparams.dataset, self.hparams.data_dir)

    def _normalize(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        arrays = load_arrays(self.hparams.dataset, self.hparams.data_dir)
        n_train = len(arrays["train_y"])
        val_size = self.hparams.val_size
        if val_size >= n_train:
            raise ValueError(f"val_size={val_size} leaves no training images (the training set "
                             f"has {n_train}); lower val_size")
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        perm = torch.randperm(n_train, generator=generator)
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        if self.hparams.train_subset is not None:
            train_idx = train_idx[: self.hparams.train_subset]
        x = self._normalize(arrays["train_x"])
        y = torch.from_numpy(arrays["train_y"].astype(np.int64))
        self.train_x, self.train_y = x[train_idx], y[train_idx]
        self.val_x, self.val_y = x[val_idx], y[val_idx]
        self.test_x = self._normalize(arrays["test_x"])
        self.test_y = torch.from_numpy(arrays["test_y"].astype(np.int64))
        self._ready = True

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorBatches(self.train_x, self.train_y),
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(self.train_y), self.hparams.split_seed),
            collate_fn=_pass_batch,
            num_workers=self.hparams.num_workers,
        )

    def _eval_loader(self, x: torch.Tensor, y: torch.Tensor) -> DataLoader:
        return DataLoader(
            TensorBatches(x, y),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            collate_fn=_pass_batch,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_size == 0:
            return []
        return self._eval_loader(self.val_x, self.val_y)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_x, self.test_y)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            x, y = batch
            return random_crop_flip(x), y
        return batch


class MNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for MNIST (same arguments, ``dataset`` fixed)."""

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("mnist", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers)


class FashionMNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for Fashion-MNIST (same arguments, ``dataset`` fixed)."""

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("fashion_mnist", data_dir, batch_size, eval_batch_size, val_size,
                         split_seed, download, augment, train_subset, num_workers)


class CIFAR10DataModule(ImageDataModule):
    """:class:`ImageDataModule` for CIFAR-10 (same arguments, ``dataset`` fixed)."""

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0) -> None:
        super().__init__("cifar10", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers)

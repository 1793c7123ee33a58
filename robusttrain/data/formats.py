"""The genuine on-disk formats of MNIST, Fashion-MNIST and CIFAR-10, read without torchvision.

* IDX, gzipped or not (MNIST, Fashion-MNIST): a 4-byte magic (two zero bytes, the dtype code 0x08
  for unsigned bytes, the number of dimensions: 0x00000801 for labels, 0x00000803 for images), one
  big-endian uint32 per dimension, then the data.
* CIFAR-10 "binary version" (``cifar-10-batches-bin/*.bin``): records of 1 label byte and
  3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32×32).
* CIFAR-10 "python version" (``cifar-10-batches-py/``): pickled dicts, read with a restricted
  unpickler that only rebuilds numpy arrays and plain containers, so a file cannot run code.

Every reader checks the structure (magic, shape, record size, label range) and raises
:class:`DatasetError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DatasetError", "read_cifar_bin", "read_cifar_python", "read_idx"]

_CIFAR_RECORD = 1 + 3 * 32 * 32
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


class DatasetError(ValueError):
    """A dataset file that is missing or unusable; the message names the file and the fix."""


def read_bytes(path: Path) -> bytes:
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


def parse_idx(path: Path, data: bytes, ndim: int | None) -> np.ndarray:
    """The array held by the IDX bytes ``data`` read from ``path`` (see :func:`read_idx`)."""
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
    return parse_idx(path, read_bytes(path), ndim)


def check_labels(labels: np.ndarray, path: Path, num_classes: int = 10) -> None:
    """Raise :class:`DatasetError` naming ``path`` when a label is outside 0..num_classes-1."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DatasetError(
            f"{path}: label {bad} out of range 0..{num_classes - 1}; "
            "the file is corrupt or not a label file, get it again"
        )


def parse_cifar_bin(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels held by the CIFAR-10 binary bytes ``data`` (see :func:`read_cifar_bin`)."""
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path}: {len(data)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
            "records; the file is truncated or corrupt, get it again"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    check_labels(labels, path)
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
    return parse_cifar_bin(path, read_bytes(path))


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
    data = read_bytes(path)
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
    check_labels(labels, path)
    return images.reshape(-1, 3, 32, 32), labels.astype(np.uint8)

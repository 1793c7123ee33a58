"""The datasets, from files on disk to batches: MNIST, Fashion-MNIST and CIFAR-10.

* :mod:`robusttrain.data.formats` — readers of the genuine file formats (IDX, CIFAR-10 binary and
  python versions) and :class:`DatasetError`.
* :mod:`robusttrain.data.sources` — the dataset table (files, mirrors, md5 sums, normalization
  constants), finding the files in ``data_dir`` or Debian's folder, checksums and downloads.
* :mod:`robusttrain.data.datamodules` — the in-memory tensors, sampler, augmentation and
  LightningDataModules (``robusttrain.data.FashionMNISTDataModule`` in configs).
"""

from robusttrain.data.datamodules import (
    CIFAR10DataModule,
    EpochShuffleSampler,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    ResumableDataLoader,
    TensorBatches,
    pass_batch,
    random_crop_flip,
)
from robusttrain.data.formats import DatasetError, read_cifar_bin, read_cifar_python, read_idx
from robusttrain.data.sources import (
    DATASETS,
    DEBIAN_FASHION_DIR,
    DatasetSpec,
    default_data_dir,
    download,
    load_arrays,
)

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_DIR",
    "DatasetError",
    "DatasetSpec",
    "ImageDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "TensorBatches",
    "EpochShuffleSampler",
    "ResumableDataLoader",
    "default_data_dir",
    "download",
    "load_arrays",
    "pass_batch",
    "random_crop_flip",
    "read_cifar_bin",
    "read_cifar_python",
    "read_idx",
]

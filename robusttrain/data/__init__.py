"""The datasets: their files, where to find or download them, and the LightningDataModules.

* :mod:`robusttrain.data.sources` — the dataset table, finding files, checksums and downloads.
"""

from robusttrain.data.sources import (
    DATASETS,
    DEBIAN_FASHION_DIR,
    CIFAR10DataModule,
    DatasetError,
    DatasetSpec,
    EpochShuffleSampler,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    TensorBatches,
    default_data_dir,
    download,
    load_arrays,
    pass_batch,
    random_crop_flip,
    read_cifar_bin,
    read_cifar_python,
    read_idx,
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
    "default_data_dir",
    "download",
    "load_arrays",
    "pass_batch",
    "random_crop_flip",
    "read_cifar_bin",
    "read_cifar_python",
    "read_idx",
]

"""LightningDataModules that hold a whole image-classification dataset in memory.

:class:`ImageDataModule` reads the files once (:func:`robusttrain.data.sources.load_arrays`),
normalizes them and serves batches gathered with one indexing op (:class:`TensorBatches`), shuffled
by a function of (seed, epoch) only (:class:`EpochShuffleSampler`) through a loader that can resume
in the middle of an epoch (:class:`ResumableDataLoader`), with an optional batched crop and flip
augmentation (:func:`random_crop_flip`) drawn from (seed, epoch, batch). Its predict loader serves
one split (``predict_split``) in order, for ``robusttrain predict``. :class:`MNISTDataModule`,
:class:`FashionMNISTDataModule` and :class:`CIFAR10DataModule` fix its ``dataset``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from robusttrain.data.sources import DATASETS, dataset_spec, download, load_arrays

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

__all__ = [
    "PREDICT_SPLITS",
    "ImageDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "TensorBatches",
    "EpochShuffleSampler",
    "ResumableDataLoader",
    "pass_batch",
    "random_crop_flip",
]


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


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is part of a checkpoint.

    Lightning saves the ``state_dict`` of every training loader that has one into the checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and hands it back to ``load_state_dict``
    before the resumed run draws its first batch. The state is the sampler's epoch and the number
    of batches this loader has yielded in it; when the resumed run iterates the same epoch again,
    the loader skips that many batches of indices (without gathering their data), so a run resumed
    from a checkpoint taken in the middle of an epoch sees exactly the batches the uninterrupted
    run saw. The skip is decided at the first batch, after Lightning's ``set_epoch``, and counts
    batches of this process: under DDP each rank skips its own share.

    Args and behaviour are those of ``torch.utils.data.DataLoader``; the sampler should have an
    ``epoch`` attribute (:class:`EpochShuffleSampler`, ``DistributedSampler``) — without one, the
    state applies to the next iteration whatever it is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position: tuple[int | None, int] = (None, 0)  # (epoch, batches yielded)
        self._pending: tuple[int | None, int] | None = None  # a loaded position not yet used

    def _sampler_epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        return epoch if isinstance(epoch, int) else None

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            epoch, batches = state_dict["epoch"], int(state_dict["batches"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"not a ResumableDataLoader state: {state_dict!r} (expected keys 'epoch' and "
                "'batches'); resume from a checkpoint written with the same data module"
            ) from None
        if batches < 0:
            raise ValueError(f"a loader state cannot have {batches} batches yielded")
        self._pending = (epoch, batches)

    # torch annotates DataLoader.__iter__ with its own private iterator class
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _ResumableIterator(self)


class _ResumableIterator:
    """The iterator of :class:`ResumableDataLoader`: counts batches, skips a loaded position."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Any = None

    def __iter__(self) -> _ResumableIterator:
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def _start(self) -> None:
        loader = self.loader
        epoch = loader._sampler_epoch()
        skip = 0
        if loader._pending is not None:
            saved_epoch, batches = loader._pending
            loader._pending = None
            if saved_epoch is None or epoch is None or saved_epoch == epoch:
                skip = batches
        self.inner = DataLoader.__iter__(loader)
        sampler_iter = getattr(self.inner, "_sampler_iter", None)
        if loader.num_workers == 0 and sampler_iter is not None:
            # single-process: drop the index batches themselves, no data is gathered
            for _ in range(skip):
                if next(sampler_iter, None) is None:
                    break
            self.inner._num_yielded += skip
        else:
            for _ in range(skip):
                if next(self.inner, None) is None:
                    break
        loader._position = (epoch, skip)

    def __next__(self) -> Any:
        if self.inner is None:
            self._start()
        batch = next(self.inner)
        epoch, batches = self.loader._position
        self.loader._position = (epoch, batches + 1)
        return batch


# the splits `predict_split` can name
PREDICT_SPLITS = ("train", "val", "test")


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
    ``Normalize``) in ``on_after_batch_transfer``, on the device, while the trainer is training,
    drawn from :meth:`augmentation_generator` (a function of the batch's place in the run).

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: where the files are (see :mod:`robusttrain.data.sources`); default
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
        predict_split: the split :meth:`predict_dataloader` serves (``robusttrain predict``):
            ``"train"`` (the training part, after ``val_size`` and ``train_subset``, not shuffled
            and not augmented), ``"val"`` or ``"test"``; each in the order of ``train_x``,
            ``val_x``, ``test_x``, in batches of ``eval_batch_size``.
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
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        spec = dataset_spec(dataset)
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
        if predict_split not in PREDICT_SPLITS:
            raise ValueError(f"predict_split must be one of {', '.join(PREDICT_SPLITS)}, "
                             f"got {predict_split!r}")
        # Saved explicitly (not from the caller's frame) so that subclasses record `dataset` too:
        # a checkpoint's datamodule hyperparameters rebuild an ImageDataModule as they are.
        self.save_hyperparameters(
            {"dataset": dataset, "data_dir": None if data_dir is None else str(data_dir),
             "batch_size": batch_size, "eval_batch_size": eval_batch_size, "val_size": val_size,
             "split_seed": split_seed, "download": bool(download), "augment": augment,
             "train_subset": train_subset, "num_workers": num_workers,
             "predict_split": predict_split}
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

    if TYPE_CHECKING:
        # Lightning types hparams as AttributeDict | MutableMapping; save_hyperparameters was
        # given a dict, which it stores as an AttributeDict (attribute access)
        @property
        def hparams(self) -> AttributeDict: ...

    def setup(self, stage: str | None = None) -> None:
        """Read the files and build the splits (once: later calls reuse the tensors)."""
        if stage == "predict" and self.hparams.predict_split == "val" and self.hparams.val_size == 0:
            raise ValueError("predict_split='val' but val_size=0 leaves no validation split; "
                             "set val_size or predict another split")
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
        return ResumableDataLoader(
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

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` split in order (the training part too: no shuffle, no augmentation)."""
        self._check_ready()
        split = self.hparams.predict_split
        x, y = {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                "test": (self.test_x, self.test_y)}[split]
        return self._eval_loader(x, y)

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training augmentation: crop with 4 pixels of black padding, random flip."""
        black = [-m / s for m, s in zip(self.spec.mean, self.spec.std)]
        return random_crop_flip(x, padding=4, fill=black, generator=generator)

    def augmentation_generator(self) -> torch.Generator | None:
        """A generator for the coming training batch, seeded by (split_seed, epoch, batch, rank).

        The crops and flips of a batch are then a function of its position in the run, so a run
        resumed in the middle of an epoch draws the same ones as the uninterrupted run. ``None``
        (the global RNG) when there is no trainer position to read.
        """
        trainer = self.trainer
        progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None),
                           "batch_progress", None)
        if trainer is None or progress is None:
            return None
        position = (self.hparams.split_seed, int(trainer.current_epoch),
                    int(progress.current.ready), int(trainer.global_rank))
        seed = 0
        for value in position:  # a fixed mix of the four numbers (no Python hash randomization)
            seed = (seed * 1_000_003 + value) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            x, y = batch
            return self.augment_batch(x, self.augmentation_generator()), y
        return batch


class MNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for MNIST (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["mnist"].input_shape
    class_names = DATASETS["mnist"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0,
                 predict_split: str = "test") -> None:
        super().__init__("mnist", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers, predict_split)


class FashionMNISTDataModule(ImageDataModule):
    """:class:`ImageDataModule` for Fashion-MNIST (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["fashion_mnist"].input_shape
    class_names = DATASETS["fashion_mnist"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0,
                 predict_split: str = "test") -> None:
        super().__init__("fashion_mnist", data_dir, batch_size, eval_batch_size, val_size,
                         split_seed, download, augment, train_subset, num_workers,
                         predict_split)


class CIFAR10DataModule(ImageDataModule):
    """:class:`ImageDataModule` for CIFAR-10 (same arguments, ``dataset`` fixed)."""

    num_classes = 10
    input_shape = DATASETS["cifar10"].input_shape
    class_names = DATASETS["cifar10"].class_names

    def __init__(self, data_dir: str | None = None, batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, split_seed: int = 0,
                 download: bool = False, augment: bool | None = None,
                 train_subset: int | None = None, num_workers: int = 0,
                 predict_split: str = "test") -> None:
        super().__init__("cifar10", data_dir, batch_size, eval_batch_size, val_size, split_seed,
                         download, augment, train_subset, num_workers, predict_split)

"""Writing and reading robusttrain checkpoints.

:class:`BestAndLastCheckpoint` writes them during a run: ``best.ckpt`` by the monitored metric and
``last.ckpt``, always the latest state. The rest of this module reads them for evaluation, without
executing code from them, and checks a checkpoint before Lightning resumes from it
(:func:`check_checkpoint_file`): an empty, cut short, foreign or non-checkpoint file ends in one
line (:class:`CheckpointError`) that names the file, what is wrong, and a whole checkpoint in the
same folder to use instead.

Every trainer of :mod:`robusttrain.training` writes a ``robusttrain`` entry into
its checkpoints: the format number (:data:`CHECKPOINT_FORMAT`), the training method, the
backbone's class path and arguments (a class of :mod:`robusttrain.models`) and the method's
settings. :func:`load_checkpoint` rebuilds the trained backbone from it and the ``state_dict``, and
returns the data settings the run was trained with (``datamodule_hyper_parameters``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from robusttrain.files import atomic_file
from robusttrain.models import build_backbone

__all__ = [
    "CHECKPOINT_FORMAT",
    "AtomicCheckpointIO",
    "BestAndLastCheckpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "check_checkpoint_file",
    "checkpoint_problem",
    "load_checkpoint",
    "whole_sibling",
]

CHECKPOINT_FORMAT = 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made to write each checkpoint whole (:func:`atomic_file`).

    Lightning 2.6's ``TorchCheckpointIO`` serializes the checkpoint to memory and writes it through
    an fsspec transaction: a temporary file in the *system* temp folder, moved to the destination
    with ``shutil.move``. When the runs folder is on another file system than ``/tmp`` that move
    is a copy into the destination itself, so an interruption leaves a truncated ``last.ckpt``,
    and nothing is fsynced (``tests/test_atomic_checkpoints.py`` pins that behaviour). Here the
    checkpoint is streamed into a temporary file in the destination's own folder, fsynced, and
    renamed over the old one: ``last.ckpt`` is always either the previous checkpoint or the new
    one. Paths with a protocol (``s3://...``) keep Lightning's own writer.

    Raises:
        CheckpointWriteError: the write failed (a full disk, a permission); the previous file
            at that path is intact.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        existed = path.is_file()
        try:
            with atomic_file(path) as f:
                torch.save(checkpoint, f)
        except OSError as err:
            if existed:
                kept = (f"the previous {path.name} is intact; free space or fix the folder's "
                        f"permissions, then resume with --ckpt_path {path}")
            else:
                kept = (f"no {path.name} was written; free space or fix the folder's "
                        "permissions and start again")
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {err.strerror or err} ({kept})"
            ) from err


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state of the run.

    Lightning (2.6) writes ``last.ckpt`` (``save_last=True``) only at a step where a top-k
    checkpoint was saved too, and at the end only if nothing was saved before: with
    ``monitor="val/acc"`` and ``save_top_k=1``, a run whose accuracy fell in its last epoch ended
    with a ``last.ckpt`` of the best epoch. This subclass also writes ``last.ckpt`` at every save
    point (end of a validation or of a training epoch) and at the end of training whenever it does
    not already hold that step, so ``last.ckpt`` is the final state; ``best.ckpt`` is unchanged.
    ``tests/test_checkpoints.py`` pins this against the installed Lightning.

    With ``last_every_n_steps=n``, ``last.ckpt`` is also refreshed after every n-th optimizer step
    (in the middle of an epoch too), so an interrupted run loses at most n steps; resuming from
    such a checkpoint is exact (``tests/test_resume.py`` kills a real run and compares).

    Args:
        last_every_n_steps: refresh ``last.ckpt`` every that many optimizer steps (0: only at the
            save points above). Other arguments: those of ``ModelCheckpoint``.
    """

    _last_written: tuple[int, int] | None = None  # (global step, validations) of last.ckpt
    _validations = 0

    def __init__(self, *args: Any, last_every_n_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (isinstance(last_every_n_steps, bool) or not isinstance(last_every_n_steps, int)
                or last_every_n_steps < 0):
            raise ValueError(
                f"last_every_n_steps must be an integer >= 0 (0: no step-based saves), got "
                f"{last_every_n_steps!r}"
            )
        if last_every_n_steps and not self.save_last:
            raise ValueError("last_every_n_steps refreshes last.ckpt: it needs save_last=True")
        self.last_every_n_steps = last_every_n_steps

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write every checkpoint of the run whole: install :class:`AtomicCheckpointIO`.

        Only Lightning's default writer is replaced; a writer the user configured (async, remote)
        is kept as it is.
        """
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written = (trainer.global_step, self._validations)

    def _refresh_last(self, trainer: Trainer) -> None:
        if (
            not self.save_last
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            # set by Lightning's debugging-flags connector; Trainer does not declare it
            or trainer.fast_dev_run  # type: ignore[attr-defined]
            or self._last_written == (trainer.global_step, self._validations)
            or trainer.global_step == 0
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # The parent saves its top-k checkpoint either at the end of each validation or at the end of
    # each training epoch (``_should_save_on_train_epoch_end``). ``last.ckpt`` is refreshed right
    # after that save, in the same hook: a save in the other hook would mark the step as saved
    # and make the parent skip its top-k save. The step-based refresh runs before a validation
    # of the same step, so it hands the parent's "saved at this step" mark back, and the
    # validation's own refresh (one more validation: a new key) writes the state after it.

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        # the last batch of an epoch is left to the epoch-end save point, which follows it
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if n and trainer.global_step % n == 0 and not last_batch:
            parent_mark = self._last_global_step_saved
            self._refresh_last(trainer)
            self._last_global_step_saved = parent_mark

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validations += 1
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


class CheckpointError(ValueError):
    """A file that cannot be used as a robusttrain checkpoint; the message says why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the file it would have replaced is intact."""


@dataclass
class LoadedCheckpoint:
    """A backbone rebuilt from a checkpoint, with the data settings it was trained on.

    Attributes:
        backbone: the network with its trained weights, in eval mode, on the CPU.
        data: keyword arguments for :class:`robusttrain.data.ImageDataModule`.
        meta: the checkpoint's ``robusttrain`` entry (method, sigma, ...), plus ``path``.
    """

    backbone: nn.Module
    data: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# what to do about an unusable checkpoint, given the whole checkpoint found beside it (or None)
Advice = Callable[[Path | None], str]

# the temporary file of :func:`robusttrain.files.atomic_file`: ``.last.ckpt.k2j3x_9a.part``
_UNFINISHED = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.part")


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes ``path`` unusable as a robusttrain checkpoint, or None when it is one.

    Only the file's pickled index is read (``torch.load(weights_only=True, mmap=True)``): its
    tensors are mapped, not read, so checking a large checkpoint costs little.

    Args:
        path: the file to look at.

    Returns:
        None for a whole robusttrain checkpoint of this format; else the rest of a sentence that
        starts with the file's name: "is empty (...)", "is cut short (...)", "is a text file ...",
        "is not a robusttrain checkpoint (...)", ...

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "notes.ckpt").write_text("epoch 3: 91%")
        12
        >>> checkpoint_problem(folder / "notes.ckpt")
        "is a text file, not a checkpoint (it starts 'epoch 3: 91%')"
        >>> torch.save({"state_dict": {}}, folder / "plain.ckpt")
        >>> checkpoint_problem(folder / "plain.ckpt")
        "is not a robusttrain checkpoint (no 'robusttrain' entry; its entries: state_dict)"
        >>> import shutil
        >>> shutil.rmtree(folder)
    """
    try:
        _read(Path(path), mmap=True)
    except _Unusable as err:
        return str(err)
    return None


def whole_sibling(path: str | Path) -> Path | None:
    """A whole robusttrain checkpoint in the folder of ``path``, other than ``path``; None if none.

    ``last.ckpt`` is tried first, then ``best.ckpt``, then the other ``.ckpt`` files, newest first.
    """
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()]
    except OSError:
        return None
    order = {"last.ckpt": 0, "best.ckpt": 1}
    others.sort(key=lambda p: (order.get(p.name, 2), -p.stat().st_mtime))
    return next((p for p in others[:8] if checkpoint_problem(p) is None), None)


def check_checkpoint_file(
    path: str | Path, option: str | None = None, advice: Advice | None = None
) -> None:
    """Stop with one line unless ``path`` is a whole robusttrain checkpoint of this format.

    For the entry points that hand a checkpoint to Lightning (``--ckpt_path``, a comparison run
    resumed from its ``last.ckpt``): Lightning's own loader ends a damaged file in a traceback
    from inside torch. Only the pickled index is read (:func:`checkpoint_problem`).

    Args:
        path: the checkpoint.
        option: how the user gave it (``--ckpt_path``), named in the message with the path.
        advice: what to do, given a whole checkpoint in the same folder (:func:`whole_sibling`) or
            None; by default "pass <option> <that checkpoint>", else "pass a checkpoint written
            by `robusttrain fit`".

    Raises:
        CheckpointError: one line naming the file, what is wrong with it, what to do, and any
            unfinished write (``.last.ckpt.*.part``) left beside it.
    """
    _read_or_raise(Path(path), option, advice, mmap=True)


class _Unusable(Exception):
    """What is wrong with a file read as a checkpoint (the rest of a sentence about it)."""


def _read_or_raise(
    path: Path, option: str | None, advice: Advice | None, mmap: bool
) -> dict[str, Any]:
    try:
        return _read(path, mmap)
    except _Unusable as err:
        problem = str(err)
    sibling = whole_sibling(path)
    if advice is None:
        use = f"pass {option} {sibling}" if option else f"use {sibling}"
        todo = (f"{sibling.name} in the same folder is whole: {use}" if sibling is not None else
                "pass a checkpoint written by `robusttrain fit` "
                "(runs/<name>/version_<k>/checkpoints/last.ckpt)")
    else:
        todo = advice(sibling)
    message = f"{option or 'checkpoint'} {path} {problem}; {todo}"
    unfinished = sorted(path.parent.glob(f".{path.name}.*.part")) if path.name else []
    if unfinished:
        message += (f" ({unfinished[0].name} beside it is an unfinished write of {path.name} "
                    "left by a run stopped while saving, not a checkpoint: delete it)")
    raise CheckpointError(" ".join(message.split()))


def _read(path: Path, mmap: bool) -> dict[str, Any]:
    """The checkpoint at ``path`` (weights only); raises :class:`_Unusable` saying what is wrong."""
    if not path.exists():
        raise _Unusable("does not exist")
    if not path.is_file():
        raise _Unusable("is not a file")
    unfinished = _UNFINISHED.fullmatch(path.name)
    if unfinished:
        raise _Unusable(f"is an unfinished write of {unfinished['name']} (the temporary file of a "
                        "run stopped while saving), not a checkpoint")
    size = path.stat().st_size
    if size == 0:
        raise _Unusable("is empty (0 bytes)")
    with path.open("rb") as f:
        head = f.read(64)
    archive = head.startswith(b"PK\x03\x04")  # torch.save's zip format
    if archive and not zipfile.is_zipfile(path):
        raise _Unusable(f"is cut short ({size} bytes, its end missing: a write or a copy that "
                        "stopped early leaves such a file)")
    if not archive and not head.startswith(b"\x80"):  # nor a pickle (torch's legacy format)
        text = _text_start(head)
        if text is not None:
            raise _Unusable(f"is a text file, not a checkpoint (it starts {text!r})")
        raise _Unusable("is not a checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and archive)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise _Unusable("is not a robusttrain checkpoint (it holds Python objects besides "
                            "tensors and settings, as other programs' checkpoints do; robusttrain "
                            "does not run code from a checkpoint)") from None
        raise _Unusable(f"is damaged (torch cannot read it: {_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - any failure here means a damaged file
        raise _Unusable(f"is damaged (torch cannot read it: {_first_line(err)})") from None
    if not isinstance(checkpoint, dict):
        raise _Unusable(f"is not a robusttrain checkpoint (it holds a {type(checkpoint).__name__}, "
                        "not a checkpoint's entries)")
    if not isinstance(checkpoint.get("robusttrain"), dict):
        if "pytorch-lightning_version" in checkpoint:
            raise _Unusable("is not a robusttrain checkpoint (a Lightning checkpoint of another "
                            "program: no 'robusttrain' entry)")
        keys = ", ".join(str(k) for k in list(checkpoint)[:5]) or "none"
        raise _Unusable(f"is not a robusttrain checkpoint (no 'robusttrain' entry; its entries: "
                        f"{keys})")
    found = checkpoint["robusttrain"].get("format")
    if found != CHECKPOINT_FORMAT:
        raise _Unusable(f"has checkpoint format {found!r}; this robusttrain reads format "
                        f"{CHECKPOINT_FORMAT}")
    return checkpoint


def _text_start(head: bytes) -> str | None:
    """The first line of ``head`` when it reads as text, else None."""
    text = head.decode("utf-8", errors="ignore").strip()
    if not text or any(not c.isprintable() and c not in "\t\r\n" for c in text):
        return None
    return text.splitlines()[0][:40]


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_checkpoint(
    path: str | Path, option: str | None = None, advice: Advice | None = None
) -> LoadedCheckpoint:
    """Rebuild the trained backbone of a robusttrain checkpoint without executing code from it.

    The file is read with ``torch.load(weights_only=True)``, and the backbone class must be one of
    :mod:`robusttrain.models`.

    Args:
        path: the checkpoint.
        option, advice: how the file was given and what to do if it is unusable, as in
            :func:`check_checkpoint_file`.

    Raises:
        CheckpointError: the file is missing, damaged, or not a robusttrain checkpoint.
    """
    path = Path(path)
    checkpoint = _read_or_raise(path, option, advice, mmap=False)
    meta = dict(checkpoint["robusttrain"])
    try:
        backbone = build_backbone(meta.get("backbone"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the backbone: {err}") from None
    state = {
        k[len("backbone.") :]: v
        for k, v in checkpoint.get("state_dict", {}).items()
        if k.startswith("backbone.")
    }
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the backbone: {first_line}") from None
    backbone.eval()
    meta["path"] = str(path)
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return LoadedCheckpoint(backbone=backbone, data=data, meta=meta)

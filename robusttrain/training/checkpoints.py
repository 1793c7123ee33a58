"""Writing and reading robusttrain checkpoints.

:class:`BestAndLastCheckpoint` writes them during a run: ``best.ckpt`` by the monitored metric and
``last.ckpt``, always the latest state. The rest of this module reads them for evaluation, without
executing code from them.

Every LightningModule of :mod:`robusttrain.training.modules` writes a ``robusttrain`` entry into
its checkpoints: the format number (:data:`CHECKPOINT_FORMAT`), the training method, the
backbone's class path and arguments (a class of :mod:`robusttrain.models`) and the method's
settings. :func:`load_checkpoint` rebuilds the trained backbone from it and the ``state_dict``, and
returns the data settings the run was trained with (``datamodule_hyper_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from robusttrain.models import build_backbone

__all__ = [
    "CHECKPOINT_FORMAT",
    "BestAndLastCheckpoint",
    "CheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = 1


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state of the run.

    Lightning (2.6) writes ``last.ckpt`` (``save_last=True``) only at a step where a top-k
    checkpoint was saved too, and at the end only if nothing was saved before: with
    ``monitor="val/acc"`` and ``save_top_k=1``, a run whose accuracy fell in its last epoch ended
    with a ``last.ckpt`` of the best epoch. This subclass also writes ``last.ckpt`` at every save
    point (end of a validation or of a training epoch) and at the end of training whenever it does
    not already hold that step, so ``last.ckpt`` is the final state; ``best.ckpt`` is unchanged.
    ``tests/test_checkpoints.py`` pins this against the installed Lightning.
    """

    _last_step_written: int | None = None

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_written = trainer.global_step

    def _refresh_last(self, trainer: Trainer) -> None:
        if (
            not self.save_last
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or trainer.fast_dev_run
            or self._last_step_written == trainer.global_step
            or trainer.global_step == 0
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # The parent saves its top-k checkpoint either at the end of each validation or at the end of
    # each training epoch (``_should_save_on_train_epoch_end``). ``last.ckpt`` is refreshed right
    # after that save, in the same hook: a save in the other hook would mark the step as saved
    # and make the parent skip its top-k save.

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
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


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Rebuild the trained backbone of a robusttrain checkpoint without executing code from it.

    The file is read with ``torch.load(weights_only=True)``, and the backbone class must be one of
    :mod:`robusttrain.models`.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a robusttrain checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise CheckpointError(
            f"{path} is not a readable weights-only checkpoint ({type(err).__name__}); "
            "pass a .ckpt written by `robusttrain fit`"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("robusttrain"), dict):
        raise CheckpointError(
            f"{path} is not a robusttrain checkpoint (no 'robusttrain' entry); "
            "pass a .ckpt written by `robusttrain fit`"
        )
    meta = dict(checkpoint["robusttrain"])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}; this robusttrain reads "
            f"format {CHECKPOINT_FORMAT}"
        )
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

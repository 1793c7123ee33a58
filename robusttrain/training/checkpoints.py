"""Reading robusttrain checkpoints for evaluation, without executing code from them.

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
from torch import nn

from robusttrain.models import build_backbone

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "LoadedCheckpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = 1


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

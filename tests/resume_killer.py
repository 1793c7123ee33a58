"""Callbacks that kill their own process or break its checkpoint writes, imported by child runs of
tests/test_resume.py and tests/test_atomic_checkpoints.py."""

from __future__ import annotations

import errno
import io
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """Kill the process with SIGKILL when training is about to run optimizer step ``step + 1``.

    Nothing is flushed or saved: the run ends as it would when a machine dies or the scheduler
    of a cluster kills the job.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _patch_torch_save(trainer, step: int, fail) -> None:
    """Make the first ``torch.save`` at global step ``step`` or later call ``fail(obj, file)``."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if trainer.global_step >= step and not getattr(save, "fired", False):
            save.fired = True
            return fail(obj, f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


class KillInCheckpointWrite(Callback):
    """SIGKILL the process halfway through writing the first checkpoint at step ``step`` or later.

    Half of the serialized checkpoint reaches the file being written (and the disk), then the
    process dies, as when a machine is switched off or a job is killed during the write.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_fit_start(self, trainer, pl_module) -> None:
        real_save = torch.save

        def half_then_die(obj, f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        _patch_torch_save(trainer, self.step, half_then_die)


class FailCheckpointWrite(Callback):
    """Make the first checkpoint write at step ``step`` or later fail as a full disk does (ENOSPC)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_fit_start(self, trainer, pl_module) -> None:
        def disk_full(obj, f):
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        _patch_torch_save(trainer, self.step, disk_full)

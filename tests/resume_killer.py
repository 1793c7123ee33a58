"""A callback that SIGKILLs its own process, for tests/test_resume.py (imported by a child run)."""

from __future__ import annotations

import os
import signal

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

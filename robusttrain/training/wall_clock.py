"""Wall time of a run in its metrics: ``time/fit_s`` at the end of every validation epoch.

Accuracy against wall time is how forward-only training is compared with backprop (a forward pass
is cheap, but it takes many): :class:`WallClock` logs the seconds the run has spent since its
training started — training steps, validation and checkpoint writes alike, start-up (imports,
reading the dataset) not — beside ``val/acc`` in ``metrics.csv``. A resumed run goes on counting
from the value saved in its checkpoint, so the column is the time of one uninterrupted run plus the
resumed run's own; the time between the interruption and the resume is not counted.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

__all__ = ["WallClock"]


class WallClock(Callback):
    """Log ``time/fit_s``, the run's wall time so far, at the end of every validation epoch."""

    def __init__(self) -> None:
        self.seconds_before = 0.0  # seconds spent by the run before this process resumed it
        self._started: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run's training started (0 before it has)."""
        if self._started is None:
            return self.seconds_before
        return self.seconds_before + time.perf_counter() - self._started

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._started is None:
            return  # the sanity check runs before training starts
        pl_module.log("time/fit_s", self.elapsed(), on_epoch=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds_before = float(state_dict.get("seconds", 0.0))

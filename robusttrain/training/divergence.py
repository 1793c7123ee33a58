"""Stop a run that diverges, with one line that says where and what to change.

A learning rate or σ far too large does not always produce a NaN: a zeroth-order run can train for
thousands of steps with weights of 1e16 and a loss of 1e33, ending "normally". :class:`DivergenceGuard`
checks, after every training step, two signs that cannot come from a healthy run:

* the training loss is not finite, or exceeds ``loss_factor`` × max(first loss, ln C), where C is
  the number of classes: ln C is the cross-entropy of guessing uniformly, so the default factor 100
  means "a hundred times worse than guessing" (the max keeps a fine-tune that starts near zero loss
  from being stopped by an ordinary bump);
* a weight is not finite, or the largest |θ| of the trainable parameters exceeds ``weight_factor`` ×
  its value when the run started (default 1000; trained networks of this project stay within 10×
  of their initialization's largest weight).

It then raises :class:`DivergenceError`, which ``robusttrain fit`` reports in one line (exit code 2).
The guard runs before the checkpoint callback in every hook (Lightning orders checkpoint callbacks
last), so the diverged state is never written: ``last.ckpt`` stays the last state saved before it.
Its reference values are saved in checkpoints, so a resumed run compares against the same start.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceError(ArithmeticError):
    """The training run diverged; the message names the step, the value and what to lower."""


class DivergenceGuard(Callback):
    """Stop training when its loss or weights blow up (see the module docstring for the tests).

    Args:
        loss_factor: stop when the training loss exceeds this many times max(first loss, ln C);
            ``None`` checks only that it is finite.
        weight_factor: stop when max |θ| exceeds this many times its value at the start;
            ``None`` checks only that the weights are finite.
        check_every_n_steps: check after every n-th optimizer step (the weight check reads every
            parameter once).
    """

    def __init__(
        self,
        loss_factor: float | None = 100.0,
        weight_factor: float | None = 1000.0,
        check_every_n_steps: int = 1,
    ) -> None:
        for name, value in (("loss_factor", loss_factor), ("weight_factor", weight_factor)):
            if value is not None and not (isinstance(value, (int, float))
                                          and math.isfinite(value) and value > 1):
                raise ValueError(f"{name} must be a number > 1 or null (no limit), got {value!r}")
        if (isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int)
                or check_every_n_steps < 1):
            raise ValueError(
                f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        self.loss_factor = loss_factor
        self.weight_factor = weight_factor
        self.check_every_n_steps = check_every_n_steps
        self.start_loss: float | None = None
        self.start_weight: float | None = None

    # ----- the references -------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start_weight is None:  # a resumed run keeps the reference of its first start
            self.start_weight = _max_abs_weight(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"start_loss": self.start_loss, "start_weight": self.start_weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_loss = state_dict.get("start_loss")
        self.start_weight = state_dict.get("start_weight")

    # ----- the check ------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.check_every_n_steps:
            return
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._check_loss(float(loss), step, trainer, pl_module)
        self._check_weights(_max_abs_weight(pl_module), step, trainer, pl_module)

    def _check_loss(self, loss: float, step: int, trainer: Trainer,
                    pl_module: LightningModule) -> None:
        if self.start_loss is None and math.isfinite(loss):
            self.start_loss = loss
            return
        if not math.isfinite(loss):
            raise DivergenceError(
                f"training diverged at step {step}: train/loss is {loss}; "
                f"{_fix(trainer, pl_module)}")
        if self.loss_factor is None or self.start_loss is None:
            return
        classes = getattr(pl_module, "num_classes", None)
        scale = max(self.start_loss, math.log(classes) if isinstance(classes, int) else 0.0)
        if loss > self.loss_factor * scale:
            raise DivergenceError(
                f"training diverged at step {step}: train/loss {loss:.3g} is over "
                f"{self.loss_factor:g} × {scale:.3g} (max of its first value and ln C); "
                f"{_fix(trainer, pl_module)}"
            )

    def _check_weights(self, largest: float, step: int, trainer: Trainer,
                       pl_module: LightningModule) -> None:
        if not math.isfinite(largest):
            raise DivergenceError(
                f"training diverged at step {step}: a weight is {largest}; "
                f"{_fix(trainer, pl_module)}")
        if self.weight_factor is None or not self.start_weight:
            return
        if largest > self.weight_factor * self.start_weight:
            raise DivergenceError(
                f"training diverged at step {step}: max |weight| {largest:.3g} is over "
                f"{self.weight_factor:g} × its start {self.start_weight:.3g}; "
                f"{_fix(trainer, pl_module)}"
            )


def _max_abs_weight(pl_module: LightningModule) -> float:
    """max |θ| over the trainable parameters (nan or inf when one is not finite).

    One reduction per tensor on its device and one transfer to the host: a check after every
    step costs one synchronisation, not one per tensor.
    """
    largest = [p.detach().abs().max().double() for p in pl_module.parameters()
               if p.requires_grad and p.numel()]
    if not largest:
        return 0.0
    return float(torch.stack(largest).max())  # torch.max propagates nan


def _fix(trainer: Trainer, pl_module: LightningModule) -> str:
    """What to change, for this kind of run, and where the last good state is."""
    advice = "lower the learning rate"
    if getattr(pl_module, "method", None) == "zeroth_order":
        advice += (", lower sigma (or level), or use fitness_shaping: centered_ranks (scale-free "
                   "steps)")
    elif getattr(pl_module, "method", None) == "noise_injection":
        advice += " or the noise level"
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    where = f"; the last checkpoint saved before it is {last}" if last else ""
    return f"{advice}, and start again (limits: --divergence.*){where}"

"""Quantization-aware training: :class:`QuantizationAwareClassifier`, backprop through a deployment.

The straight-through estimator (QAT; with faults and read noise in the deployment, QAT + noise).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from robusttrain.noise.deployment import deploy_weights_, output_converters
from robusttrain.noise.weight import noisy_parameters
from robusttrain.training.backprop import Classifier
from robusttrain.training.base import deployment_seeds, step_seed

__all__ = ["QuantizationAwareClassifier"]


class QuantizationAwareClassifier(Classifier):
    """Backprop through a deployment with the straight-through estimator (QAT, and QAT + noise).

    Each step writes one draw of the deployed weights D(θ) into the network — the deployment's
    device steps (quantization, a fresh chip of stuck-at faults / bit flips) and one draw of its
    read noise, seeds from (seed, step) — runs the forward pass (output converters with a
    straight-through rounding), takes the gradient at D(θ), restores θ bit for bit and lets the
    optimizer step θ with it: the straight-through estimator ∂D/∂θ := I of quantization-aware
    training (Bengio et al. 2013; Jacob et al. 2018). With a deployment of quantization only this
    is QAT; with read noise and faults in it, QAT + noise injection (the hardware-aware training
    of analog-AI toolkits). The float θ are the trained parameters; the deployment is applied to
    them at evaluation, as to any other model.

    With ``chip_seed`` the trainer is told one chip: every step uses that chip's device draw
    (its quantization, its stuck cells, its flipped bits: those of
    ``SimulatedChip(deployment, seed=chip_seed)``, :mod:`robusttrain.noise.chip`) with fresh read
    noise, and validation runs on that chip. This is the white-box oracle of a chip in the loop:
    backprop that knows the fault map a forward-only trainer never sees.

    Args:
        backbone, optimizer, scheduler, num_classes, seed, init_from: see :class:`Classifier`.
        deployment: the deployment to train through (required); validation runs through it too.
        chip_seed: train (and validate) on this one chip instead of a fresh chip per step.
    """

    method = "quantization_aware"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
        chip_seed: int | None = None,
    ) -> None:
        if deployment is None:
            raise ValueError(
                "QuantizationAwareClassifier needs a deployment to train through: a preset (e.g. "
                "deployment: int4), a YAML file or a list of steps"
            )
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        if chip_seed is not None and (isinstance(chip_seed, bool) or not isinstance(chip_seed, int)
                                      or chip_seed < 0):
            raise ValueError(f"chip_seed must be an integer >= 0 or null, got {chip_seed!r}")
        self.chip_seed = chip_seed
        self.automatic_optimization = False

    def eval_chip_seed(self) -> int:
        return super().eval_chip_seed() if self.chip_seed is None else self.chip_seed

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weights = [p for _, p in noisy_parameters(self.backbone)]
        chip, reads = deployment_seeds(step_seed(self.seed, self.global_step), 0)
        if self.chip_seed is not None:
            chip = self.chip_seed
        device = weights[0].device

        def deploy() -> None:
            deploy_weights_(weights, self.deployment,
                            torch.Generator(device=device).manual_seed(chip),
                            torch.Generator(device=device).manual_seed(reads))

        return self._step_with_gradient_at(
            batch, weights, deploy,
            output_converters(self.backbone, self.deployment, straight_through=True))

    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta["chip_seed"] = self.chip_seed
        return meta

    def on_train_epoch_end(self) -> None:
        self._step_scheduler_manually()

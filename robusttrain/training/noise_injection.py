"""Noise injection: :class:`NoiseInjectionClassifier`, backprop on the smoothed loss.

Each step takes the gradient at θ + σg for a fresh g (a one-sample reparameterised estimate of
∇L_σ) and steps from θ: the first-order control for the zeroth-order trainer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from robusttrain.noise.seeds import draw_noise
from robusttrain.noise.weight import draw_directions, noisy_parameters
from robusttrain.training.backprop import Classifier
from robusttrain.training.base import check_noise_level, step_seed

__all__ = ["NoiseInjectionClassifier"]


class NoiseInjectionClassifier(Classifier):
    """Backprop on the smoothed loss: the gradient at θ + σg (fresh g each step) updates θ.

    ∇_θ L(θ + σg) with g ~ N(0, I) is an unbiased one-sample estimate of ∇L_σ(θ) (the
    reparameterisation trick), so this method minimizes the same objective as
    :class:`ZerothOrderClassifier` with first-order information — the fair control for it (noise
    injection / random weight perturbation training). Without ``noise`` every trainable parameter
    is perturbed by σg, as in the zeroth-order method. With ``noise`` the perturbation is one draw
    of that deployment noise model at ``level`` — w + level·s(w)·ε on the tensors ``robusttrain
    robustness`` perturbs, from the same code (:func:`robusttrain.noise.draw_directions`): the
    hardware-aware training of analog-AI toolkits (IBM aihwkit; Joshi et al. 2020); the other
    parameters are left clean (backprop gives them their gradient). The clean weights are
    restored bit for bit before the optimizer step.

    Args:
        backbone: the network.
        optimizer: optimizer factory.
        scheduler: optional per-epoch learning-rate scheduler factory.
        num_classes: see :class:`Classifier`.
        sigma: smoothing scale σ (absolute, in weight units); unused when ``noise`` is set.
        seed: base seed of the perturbations (with the global step, fixes each step's g).
        noise: ``"relative"``, ``"absolute"`` or ``"multiplicative"`` (see
            :mod:`robusttrain.noise.weight`); ``None``: absolute ``sigma`` on every parameter.
        level: η_train in the units of ``noise`` (required with it).
        deployment, init_from: see :class:`Classifier` (validation through the deployment).
    """

    method = "noise_injection"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        sigma: float = 0.01,
        seed: int = 0,
        noise: Literal["relative", "absolute", "multiplicative"] | None = None,
        level: float | None = None,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        check_noise_level(noise, level)
        self.sigma = sigma
        self.noise = noise
        self.level = None if level is None else float(level)
        self.automatic_optimization = False

    def _perturbation(
        self, params: list[torch.Tensor], generator: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to move and their changes for this step."""
        if self.noise is None:
            noise = draw_noise(params, generator)
            changes = [z.view_as(p) * self.sigma for z, p in zip(noise.split(
                [p.numel() for p in params]), params)]
            return params, changes
        trainable = {id(p) for p in params}
        tensors = [p for _, p in noisy_parameters(self.backbone) if id(p) in trainable]
        directions = draw_directions(tensors, self.noise, generator)
        assert self.level is not None  # __init__ (check_noise_level) requires it with noise
        return tensors, [d * self.level for d in directions]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        params: list[torch.Tensor] = [p for p in self.backbone.parameters() if p.requires_grad]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(self.seed, self.global_step))
        moved, changes = self._perturbation(params, generator)
        return self._step_with_gradient_at(batch, moved,
                                           lambda: torch._foreach_add_(moved, changes))

    def on_train_epoch_end(self) -> None:
        self._step_scheduler_manually()

    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta.update(sigma=self.sigma, noise=self.noise, level=self.level)
        return meta


"""Weight-noise models, applied to a model in place and always undone.

Three models of how deployed weights differ from the trained ones (ε ~ N(0, 1) iid per weight):

* ``"absolute"``: w + σ·ε — the same absolute scale everywhere (the units of the training σ).
* ``"relative"`` (default): w + η·max|W_layer|·ε — the scale is a fraction η of the largest weight
  of each tensor, the convention of analog-hardware noise studies (IBM aihwkit; Joshi et al. 2020,
  "Accurate deep neural network inference using computational phase-change memory").
* ``"multiplicative"``: w·(1 + η·ε) — each weight off by a fraction of itself.

By default the weights of Linear and convolution layers are perturbed; biases and normalization
parameters only when asked.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["NOISE_MODELS", "noisy_parameters", "perturbed_weights", "draw_perturbation"]

NOISE_MODELS = ("relative", "absolute", "multiplicative")
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def check_noise(noise: str, level: float) -> None:
    """Raise a ValueError naming the problem for an unknown model or a bad level."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")
    if not isinstance(level, (int, float)) or not math.isfinite(level) or level < 0:
        raise ValueError(f"noise level must be a finite number >= 0, got {level!r}")


def noisy_parameters(
    model: nn.Module, include_bias: bool = False, include_norm: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """The (name, tensor) pairs a perturbation touches, in ``named_modules`` order."""
    selected = []
    for prefix, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            names = ["weight"] + (["bias"] if include_bias else [])
        elif isinstance(module, _NORM_LAYERS) and include_norm:
            names = ["weight", "bias"]
        else:
            continue
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, torch.Tensor):
                selected.append((f"{prefix}.{name}" if prefix else name, param))
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv weights to perturb; pass "
            "include_bias/include_norm or a model with such layers"
        )
    return selected


def draw_perturbation(
    tensors: list[torch.Tensor], noise: str, level: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """The additive change each tensor gets, drawn tensor after tensor from ``generator``."""
    deltas = []
    for w in tensors:
        eps = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
        if noise == "absolute":
            scale = level
        elif noise == "relative":
            scale = level * w.detach().abs().max().float()
        else:  # multiplicative: w(1 + η ε) = w + η w ε
            scale = level * w.detach().float()
        deltas.append((eps * scale).to(w.dtype))
    return deltas


@contextlib.contextmanager
def perturbed_weights(
    model: nn.Module,
    *,
    noise: str = "relative",
    level: float,
    seed: int,
    include_bias: bool = False,
    include_norm: bool = False,
) -> Iterator[nn.Module]:
    """Perturb ``model`` in place with one draw of weight noise; restore it bit for bit on exit.

    The draw is a function of ``seed`` and the shapes of the selected tensors only (a local
    generator on the model's device), so models of the same architecture get the same ε.
    Parameters and buffers (BatchNorm statistics) are restored from saved copies also when the
    body raises. Level 0 leaves the model exactly unchanged.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> before = model.weight.clone()
        >>> with perturbed_weights(model, noise="relative", level=0.1, seed=0):
        ...     changed = not torch.equal(model.weight, before)
        >>> changed, torch.equal(model.weight, before)
        (True, True)
    """
    check_noise(noise, level)
    selected = noisy_parameters(model, include_bias, include_norm)
    tensors = [p for _, p in selected]
    saved_params = [p.detach().clone() for p in tensors]
    buffers = [b for b in model.buffers()]
    saved_buffers = [b.detach().clone() for b in buffers]
    try:
        if level > 0:
            generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
            with torch.no_grad():
                for p, delta in zip(tensors, draw_perturbation(tensors, noise, level, generator)):
                    p.add_(delta)
        yield model
    finally:
        with torch.no_grad():
            for p, saved in zip(tensors, saved_params):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)

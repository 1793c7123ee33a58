r"""Weight-noise models, applied to a model in place and always undone.

Three models of how deployed weights differ from the trained ones, with ε ~ N(0, 1) iid per weight:

* ``"absolute"``: w + σ·ε — the same absolute scale everywhere (the units of the training σ).
* ``"relative"`` (default): w + η·max|W_layer|·ε — the scale is a fraction η of the largest
  magnitude in each tensor, the convention of analog-hardware noise studies (IBM aihwkit; Joshi et
  al. 2020, "Accurate deep neural network inference using computational phase-change memory",
  Nat. Commun. 11, 2473).
* ``"multiplicative"``: w·(1 + η·ε) — each weight off by a fraction of itself (a zero stays zero).

All three are w + level·s(w)·ε with a scale s(w) = 1, max|W| or w, so one draw ε gives
the perturbation at every level, and ``level = 0`` is no perturbation at all.

Which tensors: the weights of Linear and convolution layers (``nn.Linear``, ``nn.Conv1d/2d/3d``) by
default; their biases with ``include_bias``; the affine parameters of BatchNorm, GroupNorm and
LayerNorm with ``include_norm``. ε is one flat float32 ``torch.randn`` over the selected tensors, laid
out tensor after tensor (the convention of :func:`robusttrain.noise.seeds.draw_noise`), so two
models with the same architecture get the same ε from the same seed.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from robusttrain.noise.seeds import draw_noise

__all__ = [
    "NOISE_MODELS",
    "check_noise",
    "draw_directions",
    "noise_scale",
    "noisy_parameters",
    "perturbed_weights",
    "preserved_state",
    "smoothing_sigmas",
]

NOISE_MODELS = ("relative", "absolute", "multiplicative")
# multiplicative smoothing: weights smaller than this fraction of their tensor's mean |w| are smoothed
# as if they had that magnitude (a zero weight would otherwise get no smoothing and no gradient)
MULTIPLICATIVE_FLOOR = 0.1
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def check_noise(noise: str, level: float) -> float:
    """Validate a noise model and level; return the level as a float.

    Args:
        noise: one of :data:`NOISE_MODELS`.
        level: the noise level (η for relative/multiplicative noise, σ for absolute noise).

    Raises:
        ValueError: an unknown noise model (the message lists the valid ones), or a level that is
            not a finite number >= 0.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise ValueError(f"noise level must be a finite number >= 0, got {level!r}")
    level = float(level)
    if not math.isfinite(level) or level < 0:
        raise ValueError(f"noise level must be a finite number >= 0, got {level!r}")
    return level


def noisy_parameters(
    model: nn.Module, include_bias: bool = False, include_norm: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs a perturbation touches, in ``named_modules`` order.

    Args:
        model: the network.
        include_bias: also the biases of Linear and convolution layers.
        include_norm: also the weight and bias of BatchNorm, GroupNorm and LayerNorm layers.

    Raises:
        ValueError: nothing in ``model`` is selected.
    """
    selected: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()  # a parameter shared by two layers is perturbed once
    for prefix, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS):
            names = ["weight", "bias"] if include_bias else ["weight"]
        elif isinstance(module, NORM_LAYERS) and include_norm:
            names = ["weight", "bias"]
        else:
            continue
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, torch.Tensor) and id(param) not in seen:
                seen.add(id(param))
                selected.append((f"{prefix}.{name}" if prefix else name, param))
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv weights to perturb (nor, if asked, biases "
            "or normalization parameters); pass a model with such layers or set "
            "include_bias/include_norm"
        )
    return selected


def noise_scale(weight: torch.Tensor, noise: str) -> torch.Tensor | float:
    """The per-weight scale s(w) such that the perturbation is ``level * s(w) * ε``.

    Args:
        weight: one parameter tensor.
        noise: ``"absolute"`` (s = 1), ``"relative"`` (s = max|W|, a scalar per tensor) or
            ``"multiplicative"`` (s = w, so that w + η·w·ε = w·(1 + η·ε)).
    """
    if noise == "absolute":
        return 1.0
    if noise == "relative":
        return weight.detach().abs().max().float()
    if noise == "multiplicative":
        return weight.detach().float()
    raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")


def draw_directions(
    tensors: Sequence[torch.Tensor],
    noise: str,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The direction s(w)·ε of each tensor for one draw of ε; the change at level η is η·s(w)·ε.

    Args:
        tensors: the tensors to perturb, at their clean values (they set the scales of relative
            and multiplicative noise).
        noise: one of :data:`NOISE_MODELS`.
        generator: a seeded local generator on the tensors' device.
        out: optional flat float32 buffer of the total size, reused for ε.

    Returns:
        One tensor per input, of its shape and dtype.
    """
    eps = draw_noise(tensors, generator, out=out)  # flat float32 (P_total,)
    directions = []
    offset = 0
    for w in tensors:
        eps_w = eps[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
        directions.append((eps_w * noise_scale(w, noise)).to(w.dtype))
    return directions


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Copy every parameter and buffer of ``model``; write them back bit for bit on exit.

    The copies are restored also when the body raises (including ``KeyboardInterrupt``).

    Args:
        model: the network whose state the body may change in place.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    saved = [t.detach().clone() for t in tensors]
    try:
        yield model
    finally:
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved):
                tensor.copy_(copy)


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

    Inside the block each selected tensor holds w + level·s(w)·ε (see the module docstring). ε is
    drawn from a local ``torch.Generator`` on the model's device seeded with ``seed``; it depends
    only on the seed and the shapes of the selected tensors, so models of the same architecture get
    the same ε (paired comparisons) and the global RNG is untouched. The clean parameters and all
    buffers (BatchNorm running statistics, which the body may re-estimate) are copied before and
    written back on exit, also when the body raises. At level 0 nothing is changed.

    Args:
        model: the network, perturbed in place.
        noise: ``"relative"`` (default), ``"absolute"`` or ``"multiplicative"``.
        level: η (relative, multiplicative) or σ (absolute), a finite number >= 0.
        seed: seed of this draw.
        include_bias: also perturb the biases of Linear and convolution layers.
        include_norm: also perturb the affine parameters of normalization layers.

    Yields:
        The perturbed ``model``.

    Raises:
        ValueError: unknown noise model, bad level, or no tensor to perturb.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> before = model.weight.clone()
        >>> with perturbed_weights(model, noise="relative", level=0.1, seed=0):
        ...     changed = not torch.equal(model.weight, before)
        >>> changed, torch.equal(model.weight, before)
        (True, True)
    """
    level = check_noise(noise, level)
    tensors = [p for _, p in noisy_parameters(model, include_bias, include_norm)]
    with preserved_state(model):
        if level > 0:
            generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
            with torch.no_grad():
                for p, direction in zip(tensors, draw_directions(tensors, noise, generator)):
                    p.add_(direction, alpha=level)
        yield model


def smoothing_sigmas(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    *,
    noise: str,
    level: float,
    sigma: float,
    include_bias: bool = False,
    include_norm: bool = False,
) -> list[torch.Tensor | float]:
    r"""Per-element standard deviation of the smoothing that matches a weight-noise model.

    Training at level η under noise model ``noise`` minimizes E_g[L(θ + σ(θ)⊙g)] with, for each
    tensor the noise model touches (the same selection as :func:`perturbed_weights`),

    * ``"absolute"``: σ = η;
    * ``"relative"``: σ = η·max|W| (one number per tensor);
    * ``"multiplicative"``: σ = η·max(|w|, f·mean|W|) elementwise, with f =
      :data:`MULTIPLICATIVE_FLOOR` (0.1): deployment noise w·(1 + ηε) never moves a zero weight,
      so its smoothed loss would have no gradient there, and the estimator divides by σ;

    and σ = ``sigma`` (absolute) for every other tensor in ``params`` (biases, normalization
    parameters): the noise model leaves them alone, but a zeroth-order estimator needs to move
    them to give them a gradient. A tensor whose scale is zero (all-zero weights) also gets
    ``sigma``. The scales are computed from the current (clean) values and are meant to be held
    fixed for one step (docs/theory.md, §11).

    Args:
        model: the network ``params`` belong to.
        params: the tensors that will be perturbed (usually its trainable parameters), in order.
        noise: one of :data:`NOISE_MODELS`.
        level: η > 0 (σ for ``"absolute"``).
        sigma: absolute σ > 0 of the tensors outside the noise model.
        include_bias: the noise model also covers the biases of Linear/Conv layers.
        include_norm: it also covers the affine parameters of normalization layers.

    Returns:
        One entry per tensor of ``params``: a 0-dim tensor (absolute, relative), a tensor of the
        parameter's shape (multiplicative), or the float ``sigma``.
    """
    level = check_noise(noise, level)
    if level == 0:
        raise ValueError("the smoothing level must be > 0 (level 0 is no smoothing at all)")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"sigma (the absolute smoothing of tensors outside the noise model) must be a "
            f"positive number, got {sigma!r}"
        )
    covered = {id(p) for _, p in noisy_parameters(model, include_bias, include_norm)}
    sigmas: list[torch.Tensor | float] = []
    with torch.no_grad():
        for p in params:
            if id(p) not in covered:
                sigmas.append(float(sigma))
                continue
            w = p.detach().float()
            if noise == "absolute":
                value = torch.full((), level, device=w.device)
            elif noise == "relative":
                value = level * w.abs().max()
            else:
                magnitude = w.abs()
                value = level * torch.clamp(magnitude, min=MULTIPLICATIVE_FLOOR * magnitude.mean())
            sigmas.append(value if bool((value > 0).all()) else float(sigma))
    return sigmas

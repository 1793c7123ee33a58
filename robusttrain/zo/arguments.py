"""Checks of the arguments every estimator path shares, and the per-tensor smoothing scales.

The in-place loop (:mod:`robusttrain.zo.estimators`), the batched engine
(:mod:`robusttrain.zo.population`) and the population-parallel steps (:mod:`robusttrain.zo.parallel`)
take the same ``params``, ``sigma`` (one number, or one scale per tensor), ``num_pairs``, ``seed``
and loss functions; these functions check them once, with messages that name the fix, and turn
per-tensor scales into the flat layout of :func:`robusttrain.noise.seeds.draw_noise`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from robusttrain.zo.coefficients import NonFiniteLossError, check_estimator, check_sigma
from robusttrain.zo.perturbations import Perturbation

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = [
    "Sigmas",
    "check_estimator_args",
    "elementwise_lowrank_error",
    "flat_sigmas",
    "loss_value",
    "per_tensor",
]

Sigmas = list[float | torch.Tensor] | tuple[float | torch.Tensor, ...]
"""One smoothing scale per tensor: a list or a tuple, the sequences :func:`per_tensor` recognises."""


def check_estimator_args(
    params: list[torch.Tensor], sigma: float | Sigmas, num_pairs: int,
    seed: int, estimator: str,
) -> None:
    check_estimator(estimator)
    if not per_tensor(sigma):
        check_sigma(sigma)
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, numbers.Integral) or num_pairs < 1:
        raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if len(params) == 0:
        raise ValueError(
            "params is empty: pass the tensors to perturb, e.g. list(model.parameters())"
        )
    seen: dict[int, int] = {}
    for index, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            what = type(p).__name__ if not isinstance(p, torch.Tensor) else f"a {p.dtype} tensor"
            raise ValueError(
                f"params[{index}] is {what}; every entry must be a floating-point tensor"
            )
        if id(p) in seen:
            raise ValueError(
                f"params[{seen[id(p)]}] and params[{index}] are the same tensor; pass each "
                "tensor once (model.parameters() already does)"
            )
        seen[id(p)] = index
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"params live on several devices {sorted(map(str, devices))}; move them to one "
            "(model.to(device))"
        )
    if per_tensor(sigma):
        _check_sigmas(params, sigma)


def per_tensor(sigma: object) -> TypeIs[Sigmas]:
    """Whether ``sigma`` gives one scale per tensor (a list or tuple) rather than one number."""
    return isinstance(sigma, (list, tuple))


def _check_sigmas(params: list[torch.Tensor], sigmas: Sequence[float | torch.Tensor]) -> None:
    if len(sigmas) != len(params):
        raise ValueError(
            f"sigma has {len(sigmas)} entries but there are {len(params)} tensors to perturb; "
            "give one scale per tensor (robusttrain.noise.smoothing_sigmas makes them)"
        )
    for index, (p, s) in enumerate(zip(params, sigmas)):
        if isinstance(s, torch.Tensor):
            try:
                torch.broadcast_shapes(s.shape, p.shape)
            except RuntimeError:
                ok = False
            else:
                ok = s.dim() == 0 or s.shape == p.shape
            if not ok:
                raise ValueError(
                    f"sigma[{index}] has shape {tuple(s.shape)}; it must be a number, a 0-dim "
                    f"tensor or a tensor of the parameter's shape {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                raise ValueError(
                    f"sigma[{index}] must be positive and finite everywhere (the estimator divides "
                    "by it)"
                )
        else:
            try:
                check_sigma(s)
            except ValueError as err:
                raise ValueError(f"sigma[{index}]: {err}") from None


def elementwise_lowrank_error(index: int) -> ValueError:
    """The refusal of an elementwise scale on a tensor with low-rank directions."""
    return ValueError(
        f"sigma[{index}] varies within a tensor that gets low-rank directions: an elementwise "
        "scale times A Bᵀ is no longer low rank (multiplicative noise cannot be low-rank); use "
        "perturbation 'gaussian'"
    )


def flat_sigmas(
    params: list[torch.Tensor], sigmas: Sequence[float | torch.Tensor], family: Perturbation
) -> torch.Tensor:
    """The per-element scales as one flat float32 vector in ``draw_noise``'s layout."""
    flat = []
    for index, (p, s) in enumerate(zip(params, sigmas)):
        if isinstance(s, torch.Tensor) and s.dim() > 0 and family.is_lowrank(p):
            raise elementwise_lowrank_error(index)
        value = s.detach().float() if isinstance(s, torch.Tensor) else torch.tensor(float(s))
        flat.append(value.to(p.device).expand(p.shape).reshape(-1))
    return torch.cat(flat)


def loss_value(loss_fn: Callable[[], torch.Tensor | float], pair: int | None, sign: str) -> float:
    """Call ``loss_fn`` once and return its value as a finite Python float."""
    value = loss_fn()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar loss, got a tensor of shape {tuple(value.shape)}; "
                "reduce it, e.g. with .mean()"
            )
        value = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    else:
        raise ValueError(
            f"loss_fn must return a scalar loss (a tensor or a float), got {type(value).__name__}"
        )
    if not math.isfinite(value):
        where = "the clean parameters" if pair is None else f"pair {pair}, {sign}sigma"
        raise NonFiniteLossError(
            f"the loss is {value} at {where}; the parameters were restored. Lower the learning "
            "rate or sigma, or check the inputs for NaN",
            pair=pair, sign=sign or None, value=value,
        )
    return value

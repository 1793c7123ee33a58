"""The seeding convention shared by the zeroth-order estimators and the weight-noise models.

A perturbation of a list of tensors is one flat float32 ``torch.randn`` vector ε over all of them,
laid out tensor after tensor (:func:`draw_noise`), drawn from a local ``torch.Generator`` whose
seed is a pure function of a base seed and the index of the draw (:func:`pair_seed`). The
estimators (pair i of a step), the training methods (step k of a run) and the robustness evaluation
(draw k at every level) all follow it, so the same seed gives the same directions on every path,
the global RNG is never used, and a perturbation is regenerated from its seed instead of stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["draw_noise", "pair_seed"]

_MASK63 = (1 << 63) - 1


def pair_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th noise draw of an estimate made with ``seed`` (a 63-bit mix).

    Every path that evaluates perturbed losses (the in-place loop of
    :mod:`robusttrain.zo.estimators`, the batched population path) draws pair ``index``'s noise as
    ``draw_noise(params, torch.Generator(...).manual_seed(pair_seed(seed, index)))``, so they
    perturb in exactly the same directions.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK63
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK63
    return x ^ (x >> 29)


def draw_noise(
    params: Sequence[torch.Tensor], generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One standard-normal direction for all ``params``, as a flat float32 vector.

    The vector is laid out parameter after parameter in the order of ``params`` (each flattened,
    row-major), drawn with a single ``torch.randn`` call from ``generator``.

    Args:
        params: the tensors being perturbed (only their sizes and device are used).
        generator: a seeded local generator on the params' device.
        out: optional preallocated flat buffer of the total size, reused across pairs.
    """
    total = sum(p.numel() for p in params)
    device = params[0].device
    if out is None:
        out = torch.empty(total, device=device, dtype=torch.float32)
    return torch.randn(total, generator=generator, device=device, dtype=torch.float32, out=out)

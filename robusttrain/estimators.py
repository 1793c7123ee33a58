r"""Zeroth-order estimators of the gradient of the Gaussian-smoothed loss.

The smoothed loss of a black-box loss L is L_σ(θ) = E_{g~N(0,I)}[L(θ + σg)]. Differentiating the
Gaussian density (Stein's lemma) gives its gradient from loss values only,

    ∇L_σ(θ) = E[L(θ + σg) g] / σ                                        ("plain")
            = E[(L(θ + σg) − L(θ)) g] / σ                               ("one_sided")
            = E[(L(θ + σg) − L(θ − σg)) g] / (2σ)                       ("antithetic")

(Nesterov & Spokoiny 2017, "Random gradient-free minimization of convex functions"; the antithetic,
or mirrored, form is the one of OpenAI ES, Salimans et al. 2017). All three are unbiased for ∇L_σ;
the baseline and the antithetic pair cancel the part of L that does not correlate with g, so their
variance is far lower. The Monte-Carlo estimate with N pairs is

    ĝ = 1/(2σN) · Σ_i [L(θ + σz_i) − L(θ − σz_i)] z_i,     z_i ~ N(0, I).

The parameters are perturbed in place (as in MeZO, Malladi et al. 2023), pair i's direction z_i
is drawn once from a local generator seeded with ``pair_seed(seed, i)``, and the clean values are
written back from one saved copy, so memory stays near one forward pass plus two parameter-sized
buffers and the parameters come back bit for bit. See docs/theory.md for the derivations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ESTIMATORS",
    "NonFiniteLossError",
    "SmoothedGradEstimate",
    "centered_ranks",
    "draw_noise",
    "estimate_smoothed_grad",
    "pair_coefficients",
    "pair_seed",
    "smoothed_loss_grad",
]

_MASK63 = (1 << 63) - 1


def pair_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th noise draw of an estimate made with ``seed`` (a 63-bit mix).

    Every path that evaluates perturbed losses (the in-place loop here, the batched population
    path) draws pair ``index``'s noise as ``draw_noise(params, torch.Generator(...).manual_seed(
    pair_seed(seed, index)))``, so they perturb in exactly the same directions.
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


ESTIMATORS = ("antithetic", "one_sided", "plain")


class NonFiniteLossError(FloatingPointError):
    """A perturbed (or clean) loss was NaN or infinite; the parameters were left untouched."""


@dataclass
class SmoothedGradEstimate:
    """An estimate of ∇L_σ with the losses it was made from.

    Attributes:
        grads: one tensor per parameter, same shape and dtype.
        losses_plus: L(θ + σ z_i), shape (N,).
        losses_minus: L(θ − σ z_i), shape (N,), for the antithetic estimator; else ``None``.
        baseline: L(θ) for the one-sided estimator; else ``None``.
        num_forward: calls of the loss function made.
    """

    grads: list[torch.Tensor]
    losses_plus: torch.Tensor
    losses_minus: torch.Tensor | None
    baseline: float | None
    num_forward: int

    @property
    def mean_abs_diff(self) -> float:
        """Mean |L(θ+σz) − L(θ−σz)| (antithetic) or |L(θ+σz) − L(θ)| (one-sided); else NaN."""
        if self.losses_minus is not None:
            return float((self.losses_plus - self.losses_minus).abs().mean())
        if self.baseline is not None:
            return float((self.losses_plus - self.baseline).abs().mean())
        return float("nan")


def centered_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` mapped linearly onto [−0.5, 0.5] (ties broken by position)."""
    flat = values.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    if flat.numel() > 1:
        ranks = ranks / (flat.numel() - 1) - 0.5
    else:
        ranks = ranks * 0.0
    return ranks.view_as(values)


def pair_coefficients(
    losses_plus: torch.Tensor,
    losses_minus: torch.Tensor | None = None,
    *,
    sigma: float,
    estimator: str = "antithetic",
    baseline: float | None = None,
    fitness_shaping: bool = False,
) -> torch.Tensor:
    """Weights c_i of the noise directions: the estimate is Σ_i c_i z_i.

    * antithetic: c_i = (L(θ+σz_i) − L(θ−σz_i)) / (2σN)
    * one_sided:  c_i = (L(θ+σz_i) − L(θ)) / (σN)
    * plain:      c_i = L(θ+σz_i) / (σN)

    With ``fitness_shaping`` the losses are first replaced by their centered ranks in [−0.5, 0.5]
    (jointly over every loss evaluated, as in OpenAI ES); the result then estimates the gradient
    of a rank-transformed objective, not ∇L_σ: it is biased, but insensitive to the loss scale.
    """
    _check_estimator(estimator)
    n = losses_plus.numel()
    plus = losses_plus.double()
    if estimator == "antithetic":
        if losses_minus is None:
            raise ValueError("the antithetic estimator needs losses_minus")
        minus = losses_minus.double()
        if fitness_shaping:
            ranked = centered_ranks(torch.cat([plus, minus]))
            plus, minus = ranked[:n], ranked[n:]
        return (plus - minus) / (2 * sigma * n)
    if estimator == "one_sided":
        if baseline is None:
            raise ValueError("the one_sided estimator needs the baseline loss L(theta)")
        base = torch.tensor([float(baseline)], dtype=torch.float64, device=plus.device)
        if fitness_shaping:
            ranked = centered_ranks(torch.cat([plus, base]))
            plus, base = ranked[:n], ranked[n:]
        return (plus - base) / (sigma * n)
    if fitness_shaping:
        plus = centered_ranks(plus)
    return plus / (sigma * n)


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def _check_args(params: Sequence[torch.Tensor], sigma: float, num_pairs: int, estimator: str):
    _check_estimator(estimator)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}")
    if len(params) == 0:
        raise ValueError(
            "params is empty: pass the tensors to perturb, e.g. list(model.parameters())"
        )
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"params live on several devices {sorted(map(str, devices))}; move them to one"
        )


def _evaluate(loss_fn: Callable[[], torch.Tensor | float], pair: int | None, sign: str) -> float:
    value = loss_fn()
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(value):
        where = "the clean parameters" if pair is None else f"pair {pair}, {sign}sigma"
        raise NonFiniteLossError(
            f"the loss is {value} at {where}; the parameters were restored. Lower the learning "
            "rate or sigma, or check the inputs for NaN"
        )
    return value


def estimate_smoothed_grad(
    loss_fn: Callable[[], torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float,
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool = False,
) -> SmoothedGradEstimate:
    """The computation of :func:`smoothed_loss_grad`, returning the losses and forward count too."""
    params = list(params)
    _check_args(params, sigma, num_pairs, estimator)
    device = params[0].device
    clean = [p.detach().clone() for p in params]
    total = sum(p.numel() for p in params)
    noise = torch.empty(total, device=device, dtype=torch.float32)
    views = []
    offset = 0
    for p in params:
        views.append(noise[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    accum = torch.zeros(total, device=device, dtype=torch.float32)
    generator = torch.Generator(device=device)
    plus = torch.empty(num_pairs, dtype=torch.float64)
    minus = torch.empty(num_pairs, dtype=torch.float64) if estimator == "antithetic" else None
    baseline = None
    num_forward = 0

    def perturb(scale: float) -> None:
        for p, c, z in zip(params, clean, views):
            torch.add(c, z.to(p.dtype), alpha=scale, out=p)

    try:
        with torch.no_grad():
            if estimator == "one_sided":
                baseline = _evaluate(loss_fn, None, "")
                num_forward += 1
            for i in range(num_pairs):
                generator.manual_seed(pair_seed(seed, i))
                draw_noise(params, generator, out=noise)  # z_i, drawn once per pair
                perturb(sigma)
                plus[i] = _evaluate(loss_fn, i, "+")
                num_forward += 1
                if minus is not None:
                    perturb(-sigma)
                    minus[i] = _evaluate(loss_fn, i, "-")
                    num_forward += 1
                if not fitness_shaping:
                    # c_i needs only this pair's losses: accumulate while z_i is at hand
                    c_i = pair_coefficients(
                        plus[i : i + 1], None if minus is None else minus[i : i + 1],
                        sigma=sigma, estimator=estimator, baseline=baseline,
                    ) / num_pairs
                    accum.add_(noise, alpha=float(c_i))
    finally:
        with torch.no_grad():
            for p, c in zip(params, clean):
                p.copy_(c)
    if fitness_shaping:
        # ranks depend on every loss: regenerate each z_i from its seed once the losses are known
        coefficients = pair_coefficients(
            plus, minus, sigma=sigma, estimator=estimator, baseline=baseline, fitness_shaping=True
        )
        for i in range(num_pairs):
            generator.manual_seed(pair_seed(seed, i))
            draw_noise(params, generator, out=noise)
            accum.add_(noise, alpha=float(coefficients[i]))
    grads = [
        accum[o : o + p.numel()].view(p.shape).to(p.dtype).clone()
        for p, o in zip(params, _offsets(params))
    ]
    return SmoothedGradEstimate(grads, plus, minus, baseline, num_forward)


def _offsets(params: Sequence[torch.Tensor]) -> list[int]:
    offsets, offset = [], 0
    for p in params:
        offsets.append(offset)
        offset += p.numel()
    return offsets


def smoothed_loss_grad(
    loss_fn: Callable[[], torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float,
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool = False,
) -> list[torch.Tensor]:
    r"""Monte-Carlo estimate of ∇L_σ(θ), the gradient of the smoothed loss, from losses only.

    With z_i ~ N(0, I) drawn from ``pair_seed(seed, i)`` (i = 0..N−1):

    * ``"antithetic"`` (default): ĝ = 1/(2σN) Σ_i [L(θ+σz_i) − L(θ−σz_i)] z_i  (2N calls)
    * ``"one_sided"``: ĝ = 1/(σN) Σ_i [L(θ+σz_i) − L(θ)] z_i  (N + 1 calls)
    * ``"plain"``: ĝ = 1/(σN) Σ_i L(θ+σz_i) z_i, the defining formula E[L(θ+σg)g]/σ  (N calls;
      unbiased but with a variance that grows with L², for teaching and tests)

    All three are unbiased for ∇L_σ (Nesterov & Spokoiny 2017; the antithetic form is OpenAI ES's
    mirrored sampling, Salimans et al. 2017). ``fitness_shaping=True`` replaces the losses by
    their centered ranks (OpenAI ES): robust to outliers and loss scale, but *biased* for ∇L_σ.

    Args:
        loss_fn: takes no arguments, returns a scalar loss (tensor or float) computed from the
            current values of ``params``. Called under ``torch.no_grad()``.
        params: the tensors to perturb, in place; they hold exactly their prior values (bit for
            bit) when the call returns or raises.
        sigma: smoothing scale σ > 0, in the units of the parameters.
        num_pairs: N, the number of noise directions.
        seed: the estimate is a deterministic function of ``seed`` (local generators only).
        estimator: ``"antithetic"``, ``"one_sided"`` or ``"plain"``.
        fitness_shaping: use centered ranks of the losses (biased; off by default).

    Returns:
        One tensor per parameter, same shape and dtype.

    Raises:
        NonFiniteLossError: a loss was NaN or infinite (the parameters are restored first).
        ValueError: a bad argument (the message names it).

    Example:
        >>> theta = torch.tensor([0.3, -1.2, 2.0])
        >>> def loss():
        ...     return torch.cos(theta).sum()
        >>> (g,) = smoothed_loss_grad(loss, [theta], sigma=0.1, num_pairs=20000, seed=0)
        >>> truth = -math.exp(-0.1**2 / 2) * torch.sin(theta)
        >>> bool(torch.allclose(g, truth, atol=0.05))
        True
    """
    return estimate_smoothed_grad(
        loss_fn, params, sigma=sigma, num_pairs=num_pairs, seed=seed, estimator=estimator,
        fitness_shaping=fitness_shaping,
    ).grads

r"""The weights of the directions: ĝ = Σ_i c_i z_i, and what the losses go through to get them.

Every zeroth-order estimate of ∇L_σ in robusttrain is a weighted sum of its noise directions, with
weights c_i computed from the losses of the perturbed members alone (:func:`pair_coefficients`):

    antithetic:  c_i = (L(θ+σz_i) − L(θ−σz_i)) / (2σN)
    one_sided:   c_i = (L(θ+σz_i) − L(θ)) / (σN)
    plain:       c_i = L(θ+σz_i) / (σN)

optionally after fitness shaping of the losses (:func:`centered_ranks`, :func:`zscores`). The
in-place loop (:mod:`robusttrain.zo.estimators`), the batched engine
(:mod:`robusttrain.zo.population`) and the population-parallel steps (:mod:`robusttrain.zo.parallel`)
all take their c_i from here, so they agree to rounding. A non-finite loss stops the estimate with
:class:`NonFiniteLossError`; :class:`SmoothedGradEstimate` carries an estimate with its losses.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = [
    "ESTIMATORS",
    "FITNESS_SHAPINGS",
    "NonFiniteLossError",
    "SmoothedGradEstimate",
    "centered_ranks",
    "check_estimator",
    "check_sigma",
    "coefficients_of_checked",
    "fitness_shaping_name",
    "pair_coefficients",
    "zscores",
]

ESTIMATORS = ("antithetic", "one_sided", "plain")
FITNESS_SHAPINGS = ("none", "centered_ranks", "zscore")


def fitness_shaping_name(value: bool | str) -> str:
    """The canonical name of a ``fitness_shaping`` setting.

    ``False``/``"none"``: raw losses; ``True``/``"centered_ranks"``: centered ranks (OpenAI ES);
    ``"zscore"``: losses minus their mean, divided by their standard deviation (EGGROLL).
    """
    if value is False or value == "none":
        return "none"
    if value is True or value == "centered_ranks":
        return "centered_ranks"
    if value == "zscore":
        return "zscore"
    raise ValueError(
        f"fitness_shaping must be one of {', '.join(FITNESS_SHAPINGS)} (or a bool), got {value!r}"
    )


def zscores(values: torch.Tensor) -> torch.Tensor:
    """(values − mean) / std over all entries (population std); zeros when all are equal."""
    flat = values.double()
    centered = flat - flat.mean()
    std = centered.pow(2).mean().sqrt()
    if float(std) == 0.0:
        return torch.zeros_like(flat).to(values.dtype)
    return (centered / std).to(values.dtype)


class NonFiniteLossError(FloatingPointError):
    """A perturbed (or clean) loss was NaN or infinite; the parameters were left untouched.

    Args:
        message: what happened and what to try.
        pair: index of the noise direction whose loss was not finite (``None``: the clean loss).
        sign: ``"+"`` or ``"-"``, the side of the pair (``None`` for the clean loss).
        value: the offending loss value.
    """

    def __init__(
        self, message: str, *, pair: int | None = None, sign: str | None = None,
        value: float | None = None,
    ) -> None:
        super().__init__(message)
        self.pair = pair
        self.sign = sign
        self.value = value


@dataclass
class SmoothedGradEstimate:
    """An estimate of ∇L_σ with the losses it was made from.

    Attributes:
        grads: one tensor per parameter, same shape and dtype.
        losses_plus: L(θ + σ z_i), shape (N,), float64 on the CPU.
        losses_minus: L(θ − σ z_i), shape (N,), for the antithetic estimator; else ``None``.
        baseline: L(θ) for the one-sided estimator; else ``None``.
        num_forward: calls of the loss function made (perturbed members plus baseline).
        forward_equivalents: the examples those calls processed, in units of the whole batch
            (equal to ``num_forward`` unless pairs saw only part of the batch).
    """

    grads: list[torch.Tensor]
    losses_plus: torch.Tensor
    losses_minus: torch.Tensor | None
    baseline: float | None
    num_forward: int
    forward_equivalents: float | None = None

    def __post_init__(self) -> None:
        if self.forward_equivalents is None:
            self.forward_equivalents = float(self.num_forward)

    @property
    def mean_abs_diff(self) -> float:
        """Mean |L(θ+σz) − L(θ−σz)| (antithetic) or |L(θ+σz) − L(θ)| (one-sided); else NaN."""
        if self.losses_minus is not None:
            return float((self.losses_plus - self.losses_minus).abs().mean())
        if self.baseline is not None:
            return float((self.losses_plus - self.baseline).abs().mean())
        return float("nan")


def centered_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` mapped linearly onto [−0.5, 0.5] (ties broken by position).

    With n values and rank r ∈ {0, …, n−1} (0 for the smallest), the centered rank is
    r/(n − 1) − 1/2; a single value gets 0.

    Args:
        values: a tensor of any shape; ranked over all its entries.

    Returns:
        The centered ranks, same shape and dtype as ``values``.
    """
    flat = values.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort(stable=True)] = torch.arange(
        flat.numel(), dtype=flat.dtype, device=flat.device
    )
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
    fitness_shaping: bool | str = False,
) -> torch.Tensor:
    """Weights c_i of the noise directions: the estimate is ĝ = Σ_i c_i z_i.

    With N = ``losses_plus.numel()``:

    * antithetic: c_i = (L(θ+σz_i) − L(θ−σz_i)) / (2σN)
    * one_sided:  c_i = (L(θ+σz_i) − L(θ)) / (σN)
    * plain:      c_i = L(θ+σz_i) / (σN)

    With ``fitness_shaping`` the losses are first transformed jointly over every loss evaluated:
    ``"centered_ranks"`` (or ``True``) replaces them by their centered ranks in [−0.5, 0.5] (OpenAI
    ES) — the result estimates the gradient of a rank-transformed objective, not ∇L_σ: biased, but
    insensitive to the loss scale and to outliers; ``"zscore"`` subtracts their mean and divides
    by their standard deviation s (EGGROLL) — the mean cancels in every difference, so the result
    is ∇L_σ/s up to the dependence of s on the draws: a step size that adapts to the spread of
    the losses, which changes the objective's scale from step to step.
    The in-place loop and the batched population path both take their c_i from here.

    Args:
        losses_plus: L(θ + σz_i), shape (N,).
        losses_minus: L(θ − σz_i), shape (N,); required by (and only used by) ``"antithetic"``.
        sigma: the smoothing scale σ > 0 the losses were evaluated with.
        estimator: ``"antithetic"``, ``"one_sided"`` or ``"plain"``.
        baseline: the clean loss L(θ); required by ``"one_sided"``, ignored by the others.
        fitness_shaping: ``False``/``"none"`` (default), ``True``/``"centered_ranks"`` or
            ``"zscore"``.

    Returns:
        c, shape (N,), float64, on the device of ``losses_plus``.

    Raises:
        ValueError: a missing or misshapen input, or a bad ``sigma`` / ``estimator``.
        NonFiniteLossError: a loss is NaN or infinite.
    """
    check_estimator(estimator)
    check_sigma(sigma)
    if losses_plus.dim() != 1 or losses_plus.numel() == 0:
        raise ValueError(
            f"losses_plus must be a non-empty 1-D tensor (one loss per pair), got shape "
            f"{tuple(losses_plus.shape)}"
        )
    plus = losses_plus.double()
    _check_finite_losses(plus, "+")
    minus = None
    if estimator == "antithetic":
        if losses_minus is None:
            raise ValueError("the antithetic estimator needs losses_minus, the losses at θ − σz_i")
        if losses_minus.shape != losses_plus.shape:
            raise ValueError(
                f"losses_minus has shape {tuple(losses_minus.shape)} but losses_plus has "
                f"{tuple(losses_plus.shape)}; pass one loss per pair in each"
            )
        minus = losses_minus.double().to(plus.device)
        _check_finite_losses(minus, "-")
    elif losses_minus is not None:
        raise ValueError(
            f"losses_minus is only used by the antithetic estimator, not {estimator!r}; pass "
            "losses_minus=None or estimator='antithetic'"
        )
    if estimator == "one_sided":
        if baseline is None:
            raise ValueError("the one_sided estimator needs the baseline loss L(θ)")
        if not math.isfinite(float(baseline)):
            raise NonFiniteLossError(
                f"the baseline loss L(θ) is {float(baseline)}; lower the learning rate, or check "
                "the inputs for NaN", value=float(baseline),
            )
    return coefficients_of_checked(
        plus, minus, float(sigma), estimator, baseline, fitness_shaping_name(fitness_shaping)
    )


def _shape(values: torch.Tensor, shaping: str) -> torch.Tensor:
    if shaping == "centered_ranks":
        return centered_ranks(values)
    if shaping == "zscore":
        return zscores(values)
    return values


def coefficients_of_checked(
    plus: torch.Tensor, minus: torch.Tensor | None, sigma: float, estimator: str,
    baseline: float | None, fitness_shaping: bool | str,
) -> torch.Tensor:
    """:func:`pair_coefficients` on checked float64 losses; the estimator loop calls it per pair."""
    shaping = fitness_shaping_name(fitness_shaping)
    n = plus.numel()
    if estimator == "antithetic":
        assert minus is not None  # pair_coefficients checked it (and the estimator loops pass it)
        if shaping != "none":
            # jointly over all 2N losses, so a pair's difference keeps its sign and relative size
            shaped = _shape(torch.cat([plus, minus]), shaping)
            plus, minus = shaped[:n], shaped[n:]
        return (plus - minus) / (2 * sigma * n)
    if estimator == "one_sided":
        assert baseline is not None  # as minus above
        base = torch.tensor([float(baseline)], dtype=torch.float64, device=plus.device)
        if shaping != "none":
            shaped = _shape(torch.cat([plus, base]), shaping)
            plus, base = shaped[:n], shaped[n:]
        return (plus - base) / (sigma * n)
    return _shape(plus, shaping) / (sigma * n)


def _check_finite_losses(losses: torch.Tensor, sign: str) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        pair = int(bad[0])
        value = float(losses[pair])
        raise NonFiniteLossError(
            f"the loss is {value} at pair {pair}, {sign}sigma; lower the learning rate or sigma, "
            "or check the inputs for NaN", pair=pair, sign=sign, value=value,
        )


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def check_sigma(sigma: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (
        math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(
            f"sigma must be a positive finite number (the smoothing scale, e.g. 0.01), "
            f"got {sigma!r}"
        )


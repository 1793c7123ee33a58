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

The parameters are perturbed in place (as in MeZO, Malladi et al. 2023): pair i's direction z_i
is drawn once, from a local generator seeded with ``pair_seed(seed, i)``, into one reusable buffer
(the convention of :mod:`robusttrain.noise.seeds`); the parameters are written as clean ± σz_i
from one saved copy of their clean values and copied back from it, also when the loss function
raises. Memory stays near one forward pass plus three parameter-sized buffers (clean copy, noise,
estimate) and the parameters come back bit for bit.
Every estimate is ĝ = Σ_i c_i z_i with the c_i of :func:`pair_coefficients`, which the batched
path (``robusttrain.zo.population``) shares. See docs/theory.md for the derivations.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from robusttrain.noise.seeds import pair_seed
from robusttrain.zo.perturbations import Perturbation

__all__ = [
    "ESTIMATORS",
    "FITNESS_SHAPINGS",
    "NonFiniteLossError",
    "SmoothedGradEstimate",
    "centered_ranks",
    "estimate_smoothed_grad",
    "fitness_shaping_name",
    "pair_coefficients",
    "smoothed_loss_grad",
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
    _check_estimator(estimator)
    _check_sigma(sigma)
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
    return _coefficients(
        plus, minus, float(sigma), estimator, baseline, fitness_shaping_name(fitness_shaping)
    )


def _shape(values: torch.Tensor, shaping: str) -> torch.Tensor:
    if shaping == "centered_ranks":
        return centered_ranks(values)
    if shaping == "zscore":
        return zscores(values)
    return values


def _coefficients(
    plus: torch.Tensor, minus: torch.Tensor | None, sigma: float, estimator: str,
    baseline: float | None, fitness_shaping: bool | str,
) -> torch.Tensor:
    """:func:`pair_coefficients` on checked float64 losses; the estimator loop calls it per pair."""
    shaping = fitness_shaping_name(fitness_shaping)
    n = plus.numel()
    if estimator == "antithetic":
        if shaping != "none":
            # jointly over all 2N losses, so a pair's difference keeps its sign and relative size
            shaped = _shape(torch.cat([plus, minus]), shaping)
            plus, minus = shaped[:n], shaped[n:]
        return (plus - minus) / (2 * sigma * n)
    if estimator == "one_sided":
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


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def _check_sigma(sigma: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (
        math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(
            f"sigma must be a positive finite number (the smoothing scale, e.g. 0.01), "
            f"got {sigma!r}"
        )


def _check_args(
    params: list[torch.Tensor], sigma: float | Sequence[float | torch.Tensor], num_pairs: int,
    seed: int, estimator: str,
) -> None:
    _check_estimator(estimator)
    if not _per_tensor(sigma):
        _check_sigma(sigma)
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
    if _per_tensor(sigma):
        _check_sigmas(params, sigma)


def _per_tensor(sigma: object) -> bool:
    """Whether ``sigma`` gives one smoothing scale per tensor (a sequence) rather than one number."""
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
                _check_sigma(s)
            except ValueError as err:
                raise ValueError(f"sigma[{index}]: {err}") from None


def _elementwise_lowrank_error(index: int) -> ValueError:
    """The refusal of an elementwise scale on a tensor with low-rank directions."""
    return ValueError(
        f"sigma[{index}] varies within a tensor that gets low-rank directions: an elementwise "
        "scale times A Bᵀ is no longer low rank (multiplicative noise cannot be low-rank); use "
        "perturbation 'gaussian'"
    )


def _flat_sigmas(
    params: list[torch.Tensor], sigmas: Sequence[float | torch.Tensor], family: Perturbation
) -> torch.Tensor:
    """The per-element scales as one flat float32 vector in ``draw_noise``'s layout."""
    flat = []
    for index, (p, s) in enumerate(zip(params, sigmas)):
        if isinstance(s, torch.Tensor) and s.dim() > 0 and family.is_lowrank(p):
            raise _elementwise_lowrank_error(index)
        value = s.detach().float() if isinstance(s, torch.Tensor) else torch.tensor(float(s))
        flat.append(value.to(p.device).expand(p.shape).reshape(-1))
    return torch.cat(flat)


def _loss_value(loss_fn: Callable[[], torch.Tensor | float], pair: int | None, sign: str) -> float:
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


def estimate_smoothed_grad(
    loss_fn: Callable[..., torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float | Sequence[float | torch.Tensor],
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    pair_loss: bool = False,
) -> SmoothedGradEstimate:
    """The computation of :func:`smoothed_loss_grad`, returning the losses and forward count too.

    Arguments are those of :func:`smoothed_loss_grad`.

    Returns:
        The estimate (``grads``), the losses it was made from and the number of loss calls.
    """
    params = list(params)
    _check_args(params, sigma, num_pairs, seed, estimator)
    family = Perturbation(perturbation, rank)
    shaping = fitness_shaping_name(fitness_shaping)
    device = params[0].device
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    # one scale per element: the pairs move θ ± σ⊙z and the estimate divides elementwise by σ, so
    # the coefficients are those of σ = 1 (docs/theory.md, §11)
    sigma_flat = _flat_sigmas(params, sigma, family) if _per_tensor(sigma) else None
    num_pairs, seed = int(num_pairs), int(seed)
    sigma = 1.0 if sigma_flat is not None else float(sigma)
    # memory beyond the forward pass: the clean copy, one noise buffer and the accumulator
    clean = [p.detach().clone() for p in params]
    noise = torch.empty(total, device=device, dtype=torch.float32)  # z_i, reused for every pair
    noise_views = [z.view(p.shape) for z, p in zip(noise.split(sizes), params)]
    # σ⊙z_i, the step of the pair, when the scale varies between tensors
    step = noise if sigma_flat is None else torch.empty_like(noise)
    step_views = noise_views if sigma_flat is None else [
        z.view(p.shape) for z, p in zip(step.split(sizes), params)]
    # low-rank factors (A, B) of every pair are small: one block, drawn once (module docstring
    # of robusttrain.zo.perturbations); a Gaussian z_i is drawn from its own seed into `noise`
    block = family.draw_block(params, seed, num_pairs) if family.kind == "lowrank" else None
    accum = torch.zeros(total, device=device, dtype=torch.float32)  # Σ_i c_i z_i
    generator = torch.Generator(device=device)
    plus = torch.empty(num_pairs, dtype=torch.float64)
    minus = torch.empty(num_pairs, dtype=torch.float64) if estimator == "antithetic" else None
    baseline = None
    num_forward = 0

    def draw(i: int) -> None:
        if block is not None:
            family.dense(params, block[i], out=noise)
            return
        generator.manual_seed(pair_seed(seed, i))
        family.draw(params, generator, out=noise)

    def perturb(scale: float) -> None:
        # p = clean + scale·z, written from the clean copy, so no rounding error builds up
        torch._foreach_copy_(params, clean)
        torch._foreach_add_(params, step_views, alpha=scale)

    def loss_at(i: int | None, sign: str) -> float:
        if not pair_loss:
            return _loss_value(loss_fn, i, sign)
        return _loss_value(lambda: loss_fn(i), i, sign)

    try:
        with torch.no_grad():
            if estimator == "one_sided":
                if pair_loss:
                    raise ValueError(
                        "pair_loss (each pair on its own examples) needs one baseline per pair; "
                        "use estimator='antithetic'"
                    )
                baseline = loss_at(None, "")
                num_forward += 1
            for i in range(num_pairs):
                draw(i)  # z_i, drawn once: used for +σ, −σ and the accumulation
                if sigma_flat is not None:
                    torch.mul(noise, sigma_flat, out=step)
                perturb(sigma)
                plus[i] = loss_at(i, "+")
                num_forward += 1
                if minus is not None:
                    perturb(-sigma)
                    minus[i] = loss_at(i, "-")
                    num_forward += 1
                if shaping == "none":
                    # c_i needs only this pair's losses: accumulate while z_i is at hand
                    c_i = _coefficients(
                        plus[i : i + 1], None if minus is None else minus[i : i + 1],
                        sigma, estimator, baseline, "none",
                    )
                    accum.add_(noise, alpha=float(c_i) / num_pairs)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, clean)  # bit-exact restore, also after an exception
    if shaping != "none":
        # the shaped losses depend on every loss, so z_i is regenerated from its seed once they
        # are known (a second generator pass, instead of keeping N noise vectors in memory)
        coefficients = pair_coefficients(
            plus, minus, sigma=sigma, estimator=estimator, baseline=baseline,
            fitness_shaping=shaping,
        )
        for i in range(num_pairs):
            draw(i)
            accum.add_(noise, alpha=float(coefficients[i]))
    if sigma_flat is not None:
        accum.div_(sigma_flat)
    # views into the flat accumulator where the dtype already matches (no second copy)
    grads = [g.view(p.shape).to(p.dtype) for g, p in zip(accum.split(sizes), params)]
    return SmoothedGradEstimate(grads, plus, minus, baseline, num_forward)


def smoothed_loss_grad(
    loss_fn: Callable[..., torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float | Sequence[float | torch.Tensor],
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    pair_loss: bool = False,
) -> list[torch.Tensor]:
    r"""Monte-Carlo estimate of ∇L_σ(θ), the gradient of the smoothed loss, from losses only.

    With directions z_i drawn from ``pair_seed(seed, i)`` (i = 0..N−1; N(0, I) by default, see
    :mod:`robusttrain.zo.perturbations` for the low-rank family):

    * ``"antithetic"`` (default): ĝ = 1/(2σN) Σ_i [L(θ+σz_i) − L(θ−σz_i)] z_i  (2N calls)
    * ``"one_sided"``: ĝ = 1/(σN) Σ_i [L(θ+σz_i) − L(θ)] z_i  (N + 1 calls)
    * ``"plain"``: ĝ = 1/(σN) Σ_i L(θ+σz_i) z_i, the defining formula E[L(θ+σg)g]/σ  (N calls;
      unbiased but with a variance that grows with L², for teaching and tests)

    All three are unbiased for ∇L_σ (Nesterov & Spokoiny 2017; the antithetic form is OpenAI ES's
    mirrored sampling, Salimans et al. 2017). ``fitness_shaping`` transforms the losses first
    (centered ranks or z-scores, see :func:`pair_coefficients`): robust to the loss scale, but no
    longer an unbiased estimate of ∇L_σ itself.

    Each z_i is drawn once into one reusable buffer; the parameters are written as clean ± σz_i
    from one saved copy of their clean values (in place, as in MeZO, Malladi et al. 2023) and
    copied back from it, so they return bit for bit.

    Args:
        loss_fn: takes no arguments (or, with ``pair_loss``, the pair's index), returns a scalar
            loss (tensor or float) computed from the current values of ``params``. Called under
            ``torch.no_grad()``.
        params: the floating-point tensors to perturb, in place, all on one device; they hold
            exactly their prior values (bit for bit) when the call returns or raises.
        sigma: smoothing scale σ > 0, in the units of the parameters; or one scale per tensor
            of ``params`` (a number, a 0-dim tensor, or a tensor of the parameter's shape), so
            that pair i moves θ ± σ⊙z_i and the estimate is Σ_i c_i z_i / σ elementwise with the
            c_i of σ = 1 — the smoothing of a weight-noise model
            (:func:`robusttrain.noise.smoothing_sigmas`, docs/theory.md §11). An elementwise
            scale cannot be combined with low-rank directions.
        num_pairs: N, the number of noise directions.
        seed: the estimate is a deterministic function of ``seed`` (local generators only).
        estimator: ``"antithetic"``, ``"one_sided"`` or ``"plain"``.
        fitness_shaping: ``False``/``"none"`` (default), ``True``/``"centered_ranks"`` or
            ``"zscore"`` (see :func:`pair_coefficients`).
        perturbation: ``"gaussian"`` (default, dense N(0, I) directions) or ``"lowrank"``
            (rank-``rank`` directions A Bᵀ/√r on tensors of two or more dimensions, Gaussian on
            the others; see :mod:`robusttrain.zo.perturbations`).
        rank: r of the low-rank family (default 1).
        pair_loss: call ``loss_fn(i)`` with the pair's index, so that each pair can use its own
            examples (both members of a pair must see the same ones); antithetic and plain only.

    Returns:
        One tensor per parameter, same shape and dtype (float32 ones are views into one flat
        buffer).

    Raises:
        NonFiniteLossError: a loss was NaN or infinite (the parameters are restored first).
        ValueError: a bad argument, or ``loss_fn`` returned no scalar (the message names it).

    Example:
        L(θ) = Σ cos θ_i has ∇L_σ(θ) = −exp(−σ²/2) sin θ. Each coordinate of the estimate has a
        standard deviation of at most √(Σ_j sin² θ_j + sin² θ_i)/√N ≈ 1.6/√N = 0.023 here, so
        0.1 is four standard deviations:

        >>> theta = torch.tensor([0.3, -1.2, 2.0])
        >>> def loss():
        ...     return torch.cos(theta).sum()
        >>> (g,) = smoothed_loss_grad(loss, [theta], sigma=0.5, num_pairs=5000, seed=0)
        >>> truth = -math.exp(-0.5**2 / 2) * torch.sin(theta)
        >>> bool(torch.allclose(g, truth, atol=0.1))
        True
    """
    return estimate_smoothed_grad(
        loss_fn, params, sigma=sigma, num_pairs=num_pairs, seed=seed, estimator=estimator,
        fitness_shaping=fitness_shaping, perturbation=perturbation, rank=rank, pair_loss=pair_loss,
    ).grads

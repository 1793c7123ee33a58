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

from collections.abc import Callable, Sequence

import torch

from robusttrain.noise.seeds import pair_seed
from robusttrain.zo.arguments import Sigmas, check_estimator_args, flat_sigmas, loss_value, per_tensor
from robusttrain.zo.coefficients import (
    ESTIMATORS,
    FITNESS_SHAPINGS,
    NonFiniteLossError,
    SmoothedGradEstimate,
    centered_ranks,
    coefficients_of_checked,
    fitness_shaping_name,
    pair_coefficients,
    zscores,
)
from robusttrain.zo.perturbations import Perturbation

# the coefficients and result types live in robusttrain.zo.coefficients; importable from here too
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


def estimate_smoothed_grad(
    loss_fn: Callable[..., torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float | Sigmas,
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
    pair_loss: bool = False,
) -> SmoothedGradEstimate:
    """The computation of :func:`smoothed_loss_grad`, returning the losses and forward count too.

    Arguments are those of :func:`smoothed_loss_grad`.

    Returns:
        The estimate (``grads``), the losses it was made from and the number of loss calls.
    """
    params = list(params)
    check_estimator_args(params, sigma, num_pairs, seed, estimator)
    family = Perturbation(perturbation, rank, orthogonal)
    shaping = fitness_shaping_name(fitness_shaping)
    device = params[0].device
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    # one scale per element: the pairs move θ ± σ⊙z and the estimate divides elementwise by σ, so
    # the coefficients are those of σ = 1 (docs/theory.md, §11)
    sigma_flat = flat_sigmas(params, sigma, family) if per_tensor(sigma) else None
    num_pairs, seed = int(num_pairs), int(seed)
    sigma = 1.0 if per_tensor(sigma) else float(sigma)
    # memory beyond the forward pass: the clean copy, one noise buffer and the accumulator
    clean = [p.detach().clone() for p in params]
    noise = torch.empty(total, device=device, dtype=torch.float32)  # z_i, reused for every pair
    noise_views = [z.view(p.shape) for z, p in zip(noise.split(sizes), params)]
    # σ⊙z_i, the step of the pair, when the scale varies between tensors
    step = noise if sigma_flat is None else torch.empty_like(noise)
    step_views = noise_views if sigma_flat is None else [
        z.view(p.shape) for z, p in zip(step.split(sizes), params)]
    # low-rank factors (A, B) of every pair are small, and orthogonal directions are drawn
    # together: one block, drawn once (module docstring of robusttrain.zo.perturbations; for
    # orthogonal Gaussian directions it holds all N dense ones). An independent Gaussian z_i is
    # drawn from its own seed into `noise`
    block = family.draw_block(params, seed, num_pairs) if family.drawn_as_block else None
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
            return loss_value(loss_fn, i, sign)
        return loss_value(lambda: loss_fn(i), i, sign)

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
                    c_i = coefficients_of_checked(
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
    sigma: float | Sigmas,
    num_pairs: int,
    seed: int,
    estimator: str = "antithetic",
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
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
        orthogonal: make the N directions of the estimate orthogonal in groups (Choromanski et
            al. 2018): a Gaussian one stays exactly N(0, I), so the mean is unchanged, and the
            variance is lower (for a linear loss: docs/theory.md §15); a low-rank one keeps mean 0
            and identity covariance. Gaussian orthogonal directions are held as one (N, P) block,
            N·P floats, during the estimate.
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

        >>> import math
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
        fitness_shaping=fitness_shaping, perturbation=perturbation, rank=rank, orthogonal=orthogonal,
        pair_loss=pair_loss,
    ).grads

"""The zeroth-order machinery: gradients of the Gaussian-smoothed loss from forward passes only.

* :mod:`robusttrain.zo.estimators` — the antithetic, one-sided and plain estimators of ∇L_σ,
  perturbing the parameters in place and restoring them bit for bit.
* :mod:`robusttrain.zo.population` — the same estimate for MLPs, all perturbed copies in one
  batched pass.

Both draw their directions with the seeding convention of :mod:`robusttrain.noise.seeds`;
:func:`pair_seed` and :func:`draw_noise` are importable from here too.
"""

from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.zo.estimators import (
    ESTIMATORS,
    NonFiniteLossError,
    SmoothedGradEstimate,
    centered_ranks,
    estimate_smoothed_grad,
    pair_coefficients,
    smoothed_loss_grad,
)
from robusttrain.zo.population import (
    choose_population,
    perturbed_losses,
    population_smoothed_grad,
    supports_population,
)

__all__ = [
    "ESTIMATORS",
    "NonFiniteLossError",
    "SmoothedGradEstimate",
    "centered_ranks",
    "choose_population",
    "draw_noise",
    "estimate_smoothed_grad",
    "pair_coefficients",
    "pair_seed",
    "perturbed_losses",
    "population_smoothed_grad",
    "smoothed_loss_grad",
    "supports_population",
]

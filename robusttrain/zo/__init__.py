"""The zeroth-order machinery: gradients of the Gaussian-smoothed loss from forward passes only.

* :mod:`robusttrain.zo.perturbations` — the families of random directions: exact Gaussian, and
  low-rank A Bᵀ/√r on weight matrices and conv kernels (EGGROLL); either independent or
  orthogonal within a step (Choromanski et al. 2018).
* :mod:`robusttrain.zo.estimators` — the antithetic, one-sided and plain estimators of ∇L_σ,
  perturbing the parameters in place and restoring them bit for bit.
* :mod:`robusttrain.zo.node` — node perturbation: the same Gaussian weight noise drawn for every
  example on its own and Rao–Blackwellized onto the layer outputs the losses see (Linear/Conv2d
  networks); unbiased for the same ∇L_σ with variance set by the outputs, not the weights.
* :mod:`robusttrain.zo.population` — the population engine: the same estimate for any network of
  Linear/Conv2d/norm layers, all perturbed members in one batched pass, every pair on the whole
  batch (``shared``) or on its own slice of it (``split``).
* :mod:`robusttrain.zo.parallel` — population-parallel steps over several processes: each
  evaluates its share of the pairs, the processes exchange only the losses, and every process
  rebuilds the estimate from the seeds.

All draw their directions with the seeding convention of :mod:`robusttrain.noise.seeds`;
:func:`pair_seed` and :func:`draw_noise` are importable from here too.
"""

from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.zo.estimators import (
    ESTIMATORS,
    FITNESS_SHAPINGS,
    NonFiniteLossError,
    SmoothedGradEstimate,
    centered_ranks,
    estimate_smoothed_grad,
    pair_coefficients,
    smoothed_loss_grad,
)
from robusttrain.zo.node import node_smoothed_grad, node_unsupported_reason
from robusttrain.zo.parallel import (
    PARALLEL_MODES,
    engine_pair_losses,
    gather_pair_losses,
    loop_pair_losses,
    pair_share,
    rebuild_estimate,
)
from robusttrain.zo.perturbations import PERTURBATIONS, LowRankFactors, Perturbation
from robusttrain.zo.population import (
    BATCH_MODES,
    choose_population,
    perturbed_losses,
    population_smoothed_grad,
    split_rows,
    supports_population,
    unsupported_reason,
)

__all__ = [
    "BATCH_MODES",
    "ESTIMATORS",
    "FITNESS_SHAPINGS",
    "LowRankFactors",
    "NonFiniteLossError",
    "PARALLEL_MODES",
    "PERTURBATIONS",
    "Perturbation",
    "SmoothedGradEstimate",
    "centered_ranks",
    "choose_population",
    "draw_noise",
    "engine_pair_losses",
    "estimate_smoothed_grad",
    "gather_pair_losses",
    "loop_pair_losses",
    "node_smoothed_grad",
    "node_unsupported_reason",
    "pair_coefficients",
    "pair_seed",
    "pair_share",
    "perturbed_losses",
    "population_smoothed_grad",
    "rebuild_estimate",
    "smoothed_loss_grad",
    "split_rows",
    "supports_population",
    "unsupported_reason",
]

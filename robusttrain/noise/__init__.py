"""How deployed weights differ from the trained ones: weight-noise models, applied and undone.

* :mod:`robusttrain.noise.seeds` — the seeding convention (:func:`pair_seed`, :func:`draw_noise`)
  that the estimators, the training methods and the robustness evaluation share.
* :mod:`robusttrain.noise.weight` — Gaussian weight noise (absolute, relative, multiplicative) and
  the context managers that perturb a model in place and restore it bit for bit.
"""

from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.noise.weight import (
    NOISE_MODELS,
    check_noise,
    draw_directions,
    noise_scale,
    noisy_parameters,
    perturbed_weights,
    preserved_state,
    smoothing_sigmas,
)

__all__ = [
    "NOISE_MODELS",
    "check_noise",
    "draw_directions",
    "draw_noise",
    "noise_scale",
    "noisy_parameters",
    "pair_seed",
    "perturbed_weights",
    "preserved_state",
    "smoothing_sigmas",
]

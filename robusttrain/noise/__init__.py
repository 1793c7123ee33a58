"""How deployed weights differ from the trained ones: weight-noise models, applied and undone.

* :mod:`robusttrain.noise.weight` — Gaussian weight noise (absolute, relative, multiplicative) and
  the context managers that perturb a model in place and restore it bit for bit.
"""

from robusttrain.noise.weight import (
    NOISE_MODELS,
    check_noise,
    draw_directions,
    noise_scale,
    noisy_parameters,
    perturbed_weights,
    preserved_state,
)

__all__ = [
    "NOISE_MODELS",
    "check_noise",
    "draw_directions",
    "noise_scale",
    "noisy_parameters",
    "perturbed_weights",
    "preserved_state",
]

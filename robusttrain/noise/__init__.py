"""How deployed weights differ from the trained ones: weight-noise models, applied and undone.

* :mod:`robusttrain.noise.seeds` — the seeding convention (:func:`pair_seed`, :func:`draw_noise`)
  that the estimators, the training methods and the robustness evaluation share.
* :mod:`robusttrain.noise.weight` — Gaussian weight noise (absolute, relative, multiplicative) and
  the context managers that perturb a model in place and restore it bit for bit.
* :mod:`robusttrain.noise.deployment` — deployment models (weight quantization, stuck-at faults,
  bit flips, read noise, output converters), composable and described in YAML, run in place by
  :func:`deployed` and undone.
* :mod:`robusttrain.noise.pcm` — :class:`PCM`, IBM aihwkit's statistical phase-change-memory model
  (programming noise, drift, 1/f read noise at ``t_inference``), the ``pcm`` deployment step.
* :mod:`robusttrain.noise.chip` — a chip as a black box (:class:`Chip`: program, run, queries),
  :class:`SimulatedChip` (one device draw of a deployment, fresh read noise per inference) and
  :class:`ChipPort`, all a trainer in the loop may hold of it.
"""

from robusttrain.noise.chip import Chip, ChipPort, ChipQueries, SimulatedChip
from robusttrain.noise.deployment import (
    PRESETS,
    BitFlips,
    Deployment,
    OutputQuantize,
    Quantize,
    ReadNoise,
    StuckAt,
    deployed,
    inference_steps,
    parse_deployment,
    quantize_tensor,
)
from robusttrain.noise.pcm import PCM
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
    "PRESETS",
    "BitFlips",
    "Chip",
    "ChipPort",
    "ChipQueries",
    "Deployment",
    "OutputQuantize",
    "Quantize",
    "ReadNoise",
    "PCM",
    "SimulatedChip",
    "StuckAt",
    "deployed",
    "inference_steps",
    "parse_deployment",
    "quantize_tensor",
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

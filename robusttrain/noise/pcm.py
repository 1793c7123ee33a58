r"""Phase-change memory: IBM aihwkit's statistical PCM model as a deployment step (``kind: pcm``).

:class:`PCM` maps every weight tensor to conductance pairs, then programs, drifts and reads them
``t_inference`` seconds after programming, with optional global drift compensation — once per chip,
like the other device steps of :mod:`robusttrain.noise.deployment`, which registers it. The formulas,
their sources and where they differ from aihwkit: the class docstring and docs/theory.md §17.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

__all__ = ["PCM"]

# Every number below is IBM aihwkit's (src/aihwkit/inference/noise/pcm.py, PCMLikeNoiseModel, and
# docs/source/pcm_inference.rst), fitted on ~1 million PCM devices: Nandakumar et al., "Phase-change
# memory models for deep learning training and inference", ICECS 2019; Joshi et al., "Accurate deep
# neural network inference using computational phase-change memory", Nat. Commun. 11, 2473 (2020).

PCM_T0 = 20.0  # s: first read after programming, the drift reference (PCMLikeNoiseModel t_0)
PCM_T_READ = 250e-9  # s: read-pulse width of the 1/f-noise integral (PCMLikeNoiseModel t_read)
# σ_prog = c₀ + c₁·ĝ + c₂·ĝ² in µS, ĝ = g_T/g_max, fitted at g_max = 25 µS
# (PCMLikeNoiseModel.__init__ prog_coeff and apply_programming_noise_to_conductance)
PCM_PROG_COEFF = (0.26348, 1.9650, -1.1731)
PCM_PROG_G_MAX_REFERENCE = 25.0  # µS (prog_coeff_g_max_reference)
# drift exponent ν ~ |N(μ_ν, σ_ν)|, μ_ν and σ_ν linear in ln ĝ and clamped
# (PCMLikeNoiseModel.generate_drift_coefficients)
PCM_NU_MEAN = (-0.0155, 0.0244, 0.049, 0.1)  # μ_ν = clamp(a·ln ĝ + b, low, high)
PCM_NU_STD = (-0.0125, -0.0059, 0.008, 0.045)  # σ_ν = clamp(a·ln ĝ + b, low, high)
# 1/f read noise Q_s = min(0.0088 / max(ĝ_prog^0.65, 1e-3), 0.2)
# (PCMLikeNoiseModel.apply_drift_noise_to_conductance)
PCM_Q_COEFF, PCM_Q_EXPONENT, PCM_Q_FLOOR, PCM_Q_MAX = 0.0088, 0.65, 1e-3, 0.2
_PCM_ZERO_CLIP = 1e-7  # ĝ floor before the logarithm of ν (pcm.py _ZERO_CLIP)


def _check_pcm_number(value: Any, name: str, hint: str, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"pcm: {name} must be a finite number {bound} ({hint}), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class PCM:
    r"""Phase-change memory at ``t_inference`` seconds after programming (device step).

    IBM aihwkit's ``PCMLikeNoiseModel`` with its ``SinglePairConductanceConverter`` and, with
    ``drift_compensation``, its ``GlobalDriftCompensation``, reimplemented (aihwkit is not a
    dependency). For each weight tensor W, with ĝ = g/g_max and t = t_inference + t₀:

    1. map: g_T⁺ = max(w, 0)/max|W|·g_max, g_T⁻ = max(−w, 0)/max|W|·g_max (one device of the pair
       at 0);
    2. program both devices: g_prog = max(0, g_T + s_prog·σ_prog(ĝ_T)·ε),
       σ_prog = (0.26348 + 1.9650·ĝ_T − 1.1731·ĝ_T²)·g_max/25 µS;
    3. drift: ν = s_drift·|μ_ν + σ_ν·ε|, μ_ν = clamp(−0.0155·ln ĝ_T + 0.0244, 0.049, 0.1),
       σ_ν = clamp(−0.0125·ln ĝ_T − 0.0059, 0.008, 0.045); g_drift = g_prog·(t/t₀)^(−ν);
    4. read noise: g = max(0, g_drift + |g_drift|·s_read·Q_s·√ln((t + t_read)/(2·t_read))·ε),
       Q_s = min(0.0088/max(ĝ_prog^0.65, 10⁻³), 0.2);
    5. read back: w = (g⁺ − g⁻)·max|W|/g_max; with ``drift_compensation`` times
       α = mean|W_prog| / mean|W(t)|, W_prog the programmed weights (step 2 read back).

    t₀ = 20 s, t_read = 250 ns. ``t_inference`` counts from the end of programming and t₀ is added
    to it, as aihwkit does: ``t_inference = 0`` is the first read (programming and read noise, no
    drift), and any t_inference < t₀ is legal. The ε are standard normals from the device
    generator, drawn in a fixed order whatever the settings (programming ε, ν's ε, read ε, each
    for (g⁺, g⁻)), so one ``device_seed`` is one chip followed through time in a sweep of
    ``t_inference`` or of the scales. An all-zero tensor stays zero.

    Where this differs from aihwkit (its source at commit 4545f11, 2026):

    * Compensation: aihwkit's ``GlobalDriftCompensation`` (``inference/compensation/drift.py``)
      feeds the one-hot inputs eye(in) to the tile (an all-ones vector before 2022, which
      ``pcm_inference.rst`` still describes), reads out mean|output| (floored at 10⁻⁴), and
      multiplies the tile output by α = readout after programming / readout at ``t_inference``,
      before the digital bias. For an ideal tile of a Linear layer (or a convolution, whose tile
      holds W as out × in·k·k) that readout is mean|W|, so α folded into the weights gives the
      same outputs. Not modelled: the forward-pass noise of aihwkit's readout; the 10⁻⁴ floor
      (in weight units) is replaced by a guard against 0.
    * One array per tensor: aihwkit splits layers above 512×512 into tiles
      (``MappingParameter.max_input_size``/``max_output_size``), each with its own max|W| and α.
    * aihwkit's tile (``program_weights`` then ``drift_weights``) maps the programmed weights
      back to conductances with their own max|W_prog| before drifting them; here the programmed
      conductances drift, as in ``BaseNoiseModel.apply_noise``.
    * Q_s takes ĝ_prog, as aihwkit's code does (``pcm_inference.rst`` writes g_T).

    Args:
        t_inference: seconds since programming (≥ 0).
        g_max: µS, the conductance max|W| maps to (aihwkit's default 25).
        drift_compensation: rescale each tensor by the global drift-compensation factor α.
        prog_noise_scale: s_prog, multiplies the programming noise (1: the measured model).
        drift_scale: s_drift, multiplies ν (0: no drift).
        read_noise_scale: s_read, multiplies the read noise.
    """

    t_inference: float = 1.0
    g_max: float = 25.0
    drift_compensation: bool = False
    prog_noise_scale: float = 1.0
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    kind: ClassVar[str] = "pcm"
    stage: ClassVar[str] = "device"

    def __post_init__(self) -> None:
        _check_pcm_number(self.t_inference, "t_inference",
                          "seconds since programming, e.g. 3600 for an hour")
        _check_pcm_number(self.g_max, "g_max", "the conductance in µS that max|W| maps to, e.g. 25",
                          positive=True)
        if not isinstance(self.drift_compensation, bool):
            raise ValueError(f"pcm: drift_compensation must be true or false, got "
                             f"{self.drift_compensation!r}")
        for name in ("prog_noise_scale", "drift_scale", "read_noise_scale"):
            _check_pcm_number(getattr(self, name), name, "1.0 is the measured model, 0 turns it off")

    @property
    def random(self) -> bool:
        """Whether two chips can differ (some noise on; ν is random only when time passes)."""
        return (self.prog_noise_scale > 0 or self.read_noise_scale > 0
                or (self.drift_scale > 0 and self.t_inference > 0))

    def programming_noise_std(self, g_target: torch.Tensor) -> torch.Tensor:
        """σ_prog in µS at target conductances ``g_target`` (µS), before ``prog_noise_scale``."""
        g = g_target / self.g_max
        c0, c1, c2 = PCM_PROG_COEFF
        # the polynomial is ≥ 0.26 on [0, 1]; the clamp is pcm_inference.rst's max(·, 0)
        sigma = (c0 + c1 * g + c2 * g * g).clamp(min=0.0)
        return sigma * (self.g_max / PCM_PROG_G_MAX_REFERENCE)

    def program(self, g_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Programmed conductances (µS): target plus Gaussian programming noise, clamped at 0."""
        eps = torch.randn(g_target.shape, generator=generator, device=g_target.device,
                          dtype=g_target.dtype)
        g_prog = g_target + self.prog_noise_scale * self.programming_noise_std(g_target) * eps
        return g_prog.clamp(min=0.0)  # no negative conductance (as aihwkit)

    def drift_exponent_moments(self, g_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ_ν, σ_ν) of the normal that ν is folded from, at target conductances (µS)."""
        log_g = torch.log((g_target / self.g_max).abs().clamp(min=_PCM_ZERO_CLIP))
        a, b, low, high = PCM_NU_MEAN
        mean = (a * log_g + b).clamp(min=low, max=high)
        a, b, low, high = PCM_NU_STD
        std = (a * log_g + b).clamp(min=low, max=high)
        return mean, std

    def drift_exponents(self, g_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ν per device: ``drift_scale``·|N(μ_ν, σ_ν)| (a folded normal, as aihwkit)."""
        mean, std = self.drift_exponent_moments(g_target)
        eps = torch.randn(g_target.shape, generator=generator, device=g_target.device,
                          dtype=g_target.dtype)
        return (mean + std * eps).abs() * self.drift_scale

    def read_noise_std(self, g_prog: torch.Tensor) -> torch.Tensor:
        """Relative 1/f read-noise std at ``t_inference``: Q_s(ĝ_prog)·√ln((t + t_read)/(2·t_read))."""
        g = (g_prog / self.g_max).abs()
        q_s = (PCM_Q_COEFF / (g ** PCM_Q_EXPONENT).clamp(min=PCM_Q_FLOOR)).clamp(max=PCM_Q_MAX)
        t = self.t_inference + PCM_T0
        return q_s * math.sqrt(math.log((t + PCM_T_READ) / (2 * PCM_T_READ)))

    def drift_and_read(
        self, g_prog: torch.Tensor, nu: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Conductances (µS) read at ``t_inference``: drifted by (t/t₀)^(−ν), plus 1/f read noise."""
        t = self.t_inference + PCM_T0
        g_drift = g_prog * (t / PCM_T0) ** (-nu)
        eps = torch.randn(g_prog.shape, generator=generator, device=g_prog.device,
                          dtype=g_prog.dtype)
        noise = g_drift.abs() * self.read_noise_scale * self.read_noise_std(g_prog) * eps
        return (g_drift + noise).clamp(min=0.0)

    def apply(self, w: torch.Tensor, generator: torch.Generator) -> None:
        high = w.detach().abs().max()
        if high == 0:
            return  # no scale to map to conductances; an all-zero tensor stays zero
        dtype = torch.promote_types(w.dtype, torch.float32)
        scaled = w.detach().to(dtype) * (self.g_max / high.to(dtype))  # µS, in [−g_max, g_max]
        # (g⁺, g⁻) stacked on a leading axis of 2: every draw covers both devices of each pair
        g_target = torch.stack([scaled.clamp(min=0.0), (-scaled).clamp(min=0.0)])
        g_prog = self.program(g_target, generator)
        nu = self.drift_exponents(g_target, generator)
        g_now = self.drift_and_read(g_prog, nu, generator)
        to_weights = high.to(dtype) / self.g_max
        out = (g_now[0] - g_now[1]) * to_weights
        if self.drift_compensation:
            # aihwkit GlobalDriftCompensation: α = readout(programmed) / readout(now), readout =
            # mean|output| of the one-hot inputs eye(in), i.e. mean|W| over the whole tensor
            reference = ((g_prog[0] - g_prog[1]) * to_weights).abs().mean()
            current = out.abs().mean()
            if current > 0:
                out = out * (reference / current)
        w.copy_(out.to(w.dtype))

r"""Deployment models: what a trained network becomes on the hardware that runs it.

A deployment is a list of steps, each a transformation of the clean weights (or of the layer
outputs) applied in place inside :func:`deployed` and always undone on exit:

* :class:`Quantize` — k-bit symmetric uniform weight quantization, per tensor or per output
  channel, with optional clipping: w → clamp(round(w/Δ), −q, q)·Δ, q = 2^(k−1) − 1, Δ = r/q with
  r = max|W| (or min(max|W|, clip·std(W)) with ``clip``).
* :class:`StuckAt` — a fraction p of the weights stuck at 0 or at ±max|W| (``mode``).
* :class:`BitFlips` — the weights stored as int8 (per-tensor scale max|W|/127), each stored bit
  flipped with probability p (two's complement), read back.
* :class:`PCM` — phase-change memory, the statistical model of IBM's aihwkit
  (``PCMLikeNoiseModel``; Nandakumar et al. 2019, Joshi et al. 2020): each weight on a pair of
  devices (g⁺, g⁻), g = |w|/max|W|·g_max on one and 0 on the other; programming noise, drift
  g(t) = g_prog·(t/t₀)^(−ν) with a conductance-dependent ν, 1/f read noise growing with log t, all
  at ``t_inference`` seconds after programming, and optional global drift compensation.
* :class:`ReadNoise` — additive read noise in one of the models of :mod:`robusttrain.noise.weight`
  (relative, absolute, multiplicative), drawn anew at every forward pass of every layer.
* :class:`OutputQuantize` — the converter: k-bit symmetric quantization of the outputs of every
  Linear/Conv layer, over the output's own range max|y| (or a fixed ``range``).

Which steps act when: the *device* steps (quantize, stuck-at, bit flips, pcm) change the stored
weights once per device draw, in list order, with a generator seeded by ``device_seed`` — faults
are fixed per chip. The *inference* steps act at every forward pass: read noise on the stored
weights (generator seeded by ``inference_seed``, advancing from pass to pass), then output
quantization. (PCM's read noise is part of its device step, as in aihwkit: one draw at
``t_inference``, fixed for the forward passes that follow.) Only the weights of Linear and
convolution layers are deployed (biases and norm parameters stay digital), the tensors
:func:`robusttrain.noise.weight.noisy_parameters` selects.

A deployment is written in YAML (or built in Python) as a list of ``{kind: ..., <fields>}``
mappings, e.g. ``[{kind: quantize, bits: 4}, {kind: read_noise, noise: relative, level: 0.05}]``;
:data:`PRESETS` names a few.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robusttrain.noise.weight import (
    NOISE_MODELS,
    WEIGHT_LAYERS,
    check_noise,
    noise_scale,
    noisy_parameters,
    preserved_state,
)

__all__ = [
    "PCM",
    "PRESETS",
    "BitFlips",
    "Deployment",
    "OutputQuantize",
    "Quantize",
    "ReadNoise",
    "StuckAt",
    "deploy_weights_",
    "deployed",
    "output_converters",
    "parse_deployment",
    "quantize_tensor",
]


def _check_bits(bits: Any, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name}: bits must be an integer from 2 to 16, got {bits!r}")
    return bits


def _check_rate(p: Any, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def quantize_tensor(
    w: torch.Tensor, bits: int, per_channel: bool = False, clip: float | None = None
) -> torch.Tensor:
    """Symmetric uniform k-bit quantization of ``w`` (a new tensor; see the module docstring).

    Args:
        w: a weight tensor; ``per_channel`` takes one range per slice along dimension 0.
        bits: k; 2 bits give the levels {−Δ, 0, Δ}.
        per_channel: one range per output channel instead of one per tensor.
        clip: clip the range at ``clip`` standard deviations of the weights (of the channel).
    """
    q = 2 ** (bits - 1) - 1
    rows = w.shape[0] if per_channel and w.dim() > 1 else 1
    flat = w.detach().reshape(rows, -1)
    r = flat.abs().amax(dim=1, keepdim=True)
    if clip is not None:
        r = torch.minimum(r, clip * flat.std(dim=1, keepdim=True, unbiased=False))
    delta = torch.where(r > 0, r / q, torch.ones_like(r))  # an all-zero slice stays zero
    out = torch.clamp(torch.round(flat / delta), -q, q) * delta
    return out.view(w.shape).to(w.dtype)


@dataclasses.dataclass(frozen=True)
class Quantize:
    """k-bit weight quantization (device step)."""

    bits: int
    per_channel: bool = False
    clip: float | None = None
    kind: ClassVar[str] = "quantize"
    stage: ClassVar[str] = "device"

    def __post_init__(self) -> None:
        _check_bits(self.bits, "quantize")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"quantize: clip must be a positive number of standard deviations or "
                             f"null, got {self.clip!r}")

    def apply(self, w: torch.Tensor, generator: torch.Generator) -> None:
        w.copy_(quantize_tensor(w, self.bits, self.per_channel, self.clip))


@dataclasses.dataclass(frozen=True)
class StuckAt:
    """A fraction ``p`` of the weights stuck (device step, fixed per device draw).

    ``mode``: ``"zero"`` (stuck at 0), ``"max"`` (at +max|W| or −max|W|, equally likely) or
    ``"both"`` (half of the faults at 0, half at ±max|W|).
    """

    p: float
    mode: str = "both"
    kind: ClassVar[str] = "stuck_at"
    stage: ClassVar[str] = "device"

    def __post_init__(self) -> None:
        _check_rate(self.p, "stuck_at")
        if self.mode not in ("zero", "max", "both"):
            raise ValueError(f"stuck_at: mode must be zero, max or both, got {self.mode!r}")

    def apply(self, w: torch.Tensor, generator: torch.Generator) -> None:
        device = w.device
        faulty = torch.rand(w.shape, generator=generator, device=device) < self.p
        high = w.detach().abs().max()
        at_max = torch.rand(w.shape, generator=generator, device=device) < 0.5
        sign = torch.where(torch.rand(w.shape, generator=generator, device=device) < 0.5, 1.0, -1.0)
        if self.mode == "zero":
            at_max = torch.zeros_like(faulty)
        elif self.mode == "max":
            at_max = torch.ones_like(faulty)
        zero = torch.zeros((), dtype=w.dtype, device=device)
        stuck = torch.where(at_max, sign.to(w.dtype) * high, zero)
        w.copy_(torch.where(faulty, stuck, w))


@dataclasses.dataclass(frozen=True)
class BitFlips:
    """Bit flips at rate ``p`` in int8-stored weights (device step, fixed per device draw)."""

    p: float
    kind: ClassVar[str] = "bit_flips"
    stage: ClassVar[str] = "device"

    def __post_init__(self) -> None:
        _check_rate(self.p, "bit_flips")

    def apply(self, w: torch.Tensor, generator: torch.Generator) -> None:
        high = w.detach().abs().max()
        delta = high / 127 if high > 0 else torch.ones((), dtype=w.dtype, device=w.device)
        stored = torch.clamp(torch.round(w / delta), -127, 127).to(torch.int16) & 0xFF  # 8 bits
        flips = torch.rand((*w.shape, 8), generator=generator, device=w.device) < self.p
        weights = (2 ** torch.arange(8, device=w.device, dtype=torch.int16))
        mask = (flips.to(torch.int16) * weights).sum(dim=-1)
        flipped = stored ^ mask
        signed = torch.where(flipped > 127, flipped - 256, flipped)  # two's complement
        w.copy_(signed.to(w.dtype) * delta)


# ----- the PCM statistical model ------------------------------------------------------------------
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


@dataclasses.dataclass(frozen=True)
class ReadNoise:
    """Read noise on the stored weights, drawn anew at every forward pass (inference step)."""

    level: float
    noise: str = "relative"
    kind: ClassVar[str] = "read_noise"
    stage: ClassVar[str] = "inference"

    def __post_init__(self) -> None:
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"read_noise: noise must be one of {', '.join(NOISE_MODELS)}, got "
                             f"{self.noise!r}")
        check_noise(self.noise, self.level)


@dataclasses.dataclass(frozen=True)
class OutputQuantize:
    """k-bit quantization of every Linear/Conv output (inference step): the converter.

    ``range``: the full-scale value; ``None`` uses each output's own max|y| (per forward pass).
    """

    bits: int
    range: float | None = None
    kind: ClassVar[str] = "output_quantize"
    stage: ClassVar[str] = "inference"

    def __post_init__(self) -> None:
        _check_bits(self.bits, "output_quantize")
        if self.range is not None and not (isinstance(self.range, (int, float)) and self.range > 0):
            raise ValueError(f"output_quantize: range must be a positive number or null, got "
                             f"{self.range!r}")

    def quantize(self, y: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """The converted outputs; ``straight_through``: identity gradient (training)."""
        q = 2 ** (self.bits - 1) - 1
        r = y.detach().abs().max() if self.range is None else torch.tensor(self.range, device=y.device)
        if r <= 0:
            return y
        delta = r / q
        converted = torch.clamp(torch.round(y / delta), -q, q) * delta
        if straight_through:
            return y + (converted - y).detach()
        return converted


STEPS = {cls.kind: cls for cls in (Quantize, StuckAt, BitFlips, PCM, ReadNoise, OutputQuantize)}
Step = Quantize | StuckAt | BitFlips | PCM | ReadNoise | OutputQuantize


@dataclasses.dataclass(frozen=True)
class Deployment:
    """An ordered list of deployment steps (see the module docstring)."""

    steps: tuple[Step, ...]
    name: str = "deployment"

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a deployment needs at least one step")

    @property
    def device_steps(self) -> list[Step]:
        return [s for s in self.steps if s.stage == "device"]

    @property
    def random_device(self) -> bool:
        """Whether two device draws can differ (faults or bit flips with p > 0, PCM noise)."""
        return any((isinstance(s, (StuckAt, BitFlips)) and s.p > 0)
                   or (isinstance(s, PCM) and s.random) for s in self.steps)

    @property
    def random_inference(self) -> bool:
        """Whether two inference draws can differ (read noise with level > 0)."""
        return any(isinstance(s, ReadNoise) and s.level > 0 for s in self.steps)

    def to_list(self) -> list[dict[str, Any]]:
        """The YAML/JSON form: ``[{kind: ..., <fields>}, ...]``."""
        return [{"kind": s.kind, **dataclasses.asdict(s)} for s in self.steps]

    def describe(self) -> str:
        parts = []
        for s in self.steps:
            fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items() if v is not None)
            parts.append(f"{s.kind}({fields})")
        return " → ".join(parts)

    def replace(self, kind: str, field: str, value: Any) -> Deployment:
        """A copy with ``field`` of every ``kind`` step set to ``value`` (for sweeps)."""
        matching = [s for s in self.steps if s.kind == kind]
        if not matching:
            raise ValueError(f"the deployment has no {kind} step to sweep ({self.describe()})")
        names = {f.name for f in dataclasses.fields(matching[0])}
        if field not in names:
            raise ValueError(f"{kind} has no field {field!r}; it has {', '.join(sorted(names))}")
        steps = tuple(dataclasses.replace(s, **{field: value}) if s.kind == kind else s
                      for s in self.steps)
        return Deployment(steps, self.name)


def _step(entry: Any, index: int) -> Step:
    if isinstance(entry, Step):
        return entry
    if not isinstance(entry, Mapping) or "kind" not in entry:
        raise ValueError(f"deployment step {index}: expected a mapping with a 'kind' "
                         f"({', '.join(STEPS)}), got {entry!r}")
    fields = dict(entry)
    kind = fields.pop("kind")
    if kind not in STEPS:
        raise ValueError(f"deployment step {index}: unknown kind {kind!r}; choose one of "
                         f"{', '.join(STEPS)}")
    cls = STEPS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"deployment step {index} ({kind}): unknown field(s) {', '.join(unknown)}; "
                         f"{kind} takes {', '.join(sorted(known))}")
    try:
        return cls(**fields)
    except TypeError as err:
        raise ValueError(f"deployment step {index} ({kind}): {err}") from None


PRESETS: dict[str, list[dict[str, Any]]] = {
    "int8": [{"kind": "quantize", "bits": 8}],
    "int4": [{"kind": "quantize", "bits": 4}],
    "int3": [{"kind": "quantize", "bits": 3}],
    "int2": [{"kind": "quantize", "bits": 2}],
    "int4_noisy": [{"kind": "quantize", "bits": 4},
                   {"kind": "read_noise", "noise": "relative", "level": 0.05}],
    "int2_noisy": [{"kind": "quantize", "bits": 2},
                   {"kind": "read_noise", "noise": "relative", "level": 0.05}],
    "int4_faulty": [{"kind": "quantize", "bits": 4}, {"kind": "stuck_at", "p": 0.01},
                    {"kind": "read_noise", "noise": "relative", "level": 0.05}],
    "analog": [{"kind": "read_noise", "noise": "relative", "level": 0.05},
               {"kind": "output_quantize", "bits": 8}],
    "pcm": [{"kind": "pcm"}],
    "pcm_compensated": [{"kind": "pcm", "drift_compensation": True}],
}


def parse_deployment(spec: Any) -> Deployment:
    """A :class:`Deployment` from a preset name, a YAML file, a list of steps, or a Deployment.

    Raises:
        ValueError: an unknown preset or step, a bad field value, or a file that is not a list
            of steps (the message names which).
    """
    if isinstance(spec, Deployment):
        return spec
    name = "deployment"
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text in PRESETS:
            name, spec = text, PRESETS[text]
        elif Path(text).is_file():
            import yaml

            name = Path(text).stem
            try:
                spec = yaml.safe_load(Path(text).read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"{text} is not valid YAML: {err}") from None
            if isinstance(spec, Mapping) and "steps" in spec:
                spec = spec["steps"]
        else:
            raise ValueError(f"deployment {text!r} is neither a preset ({', '.join(PRESETS)}) nor "
                             "a YAML file")
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)):
        raise ValueError(f"a deployment is a list of steps, got {type(spec).__name__}")
    return Deployment(tuple(_step(entry, i) for i, entry in enumerate(spec)), name)


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


@contextlib.contextmanager
def deployed(
    model: nn.Module, deployment: Any, *, device_seed: int = 0, inference_seed: int = 0
) -> Iterator[nn.Module]:
    """Run ``model`` as ``deployment`` inside the block; restore it bit for bit on exit.

    The device steps change the weights in place once, in list order, from a generator seeded
    with ``device_seed``; forward hooks add read noise to each layer's stored weights before its
    forward pass (a generator seeded with ``inference_seed``, one draw per layer and pass; the
    stored weights are written back after the pass) and quantize its outputs. Parameters,
    buffers and hooks are restored also when the body raises.

    Args:
        model: the network (its Linear and convolution weights are deployed).
        deployment: anything :func:`parse_deployment` accepts.
        device_seed: seed of the chip: stuck-at faults and bit flips.
        inference_seed: seed of the read noise of this run of inferences.

    Yields:
        The deployed ``model``.
    """
    deployment = parse_deployment(deployment)
    weights = [p for _, p in noisy_parameters(model)]
    device = weights[0].device
    read_noise = [s for s in deployment.steps if isinstance(s, ReadNoise) and s.level > 0]
    converters = [s for s in deployment.steps if isinstance(s, OutputQuantize)]
    handles = []
    with preserved_state(model):
        try:
            deploy_weights_(weights, deployment, _seeded(device_seed, device))
            if read_noise or converters:
                inference = _seeded(inference_seed, device)
                for module in model.modules():
                    if isinstance(module, WEIGHT_LAYERS):
                        handles += _hooks(module, read_noise, converters, inference)
            yield model
        finally:
            for handle in handles:
                handle.remove()


def deploy_weights_(
    weights: Sequence[torch.Tensor],
    deployment: Any,
    device_generator: torch.Generator,
    inference_generator: torch.Generator | None = None,
) -> None:
    """Write the deployed weights into ``weights`` in place (no undo: the caller keeps a copy).

    The device steps in list order from ``device_generator``; with ``inference_generator``, then
    one draw of each read-noise step per tensor, scaled by the device-stepped weights — what one
    forward pass of :func:`deployed` sees, for training through the deployment
    (quantization-aware training holds one draw fixed for the forward and backward pass of a
    step). Output converters are not weights: see :func:`output_converters`.

    Args:
        weights: the Linear/Conv weight tensors (:func:`robusttrain.noise.noisy_parameters`).
        deployment: anything :func:`parse_deployment` accepts.
        device_generator: draws the faults and bit flips (the chip).
        inference_generator: draws the read noise; ``None`` applies no read noise.
    """
    deployment = parse_deployment(deployment)
    with torch.no_grad():
        for step in deployment.device_steps:
            for w in weights:
                step.apply(w, device_generator)
        if inference_generator is None:
            return
        for step in deployment.steps:
            if isinstance(step, ReadNoise) and step.level > 0:
                for w in weights:
                    eps = torch.randn(w.shape, generator=inference_generator, device=w.device,
                                      dtype=torch.float32)
                    w.add_((eps * noise_scale(w, step.noise)).to(w.dtype), alpha=step.level)


@contextlib.contextmanager
def output_converters(
    model: nn.Module, deployment: Any, *, straight_through: bool = False
) -> Iterator[nn.Module]:
    """Quantize every Linear/Conv output as the deployment's converters do, inside the block.

    Args:
        model: the network.
        deployment: anything :func:`parse_deployment` accepts (only its ``output_quantize`` steps
            act here).
        straight_through: pass the gradient through the rounding unchanged (the
            straight-through estimator), for training by backprop.
    """
    converters = [s for s in parse_deployment(deployment).steps if isinstance(s, OutputQuantize)]

    def hook(mod: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        for converter in converters:
            output = converter.quantize(output, straight_through)
        return output

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if converters and isinstance(m, WEIGHT_LAYERS)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _hooks(
    module: nn.Module, read_noise: list[ReadNoise], converters: list[OutputQuantize],
    generator: torch.Generator,
) -> list[Any]:
    stored: list[torch.Tensor] = []

    def before(mod: nn.Module, inputs: Any) -> None:
        if not read_noise:
            return
        w = mod.weight
        assert isinstance(w, torch.Tensor)  # the hooks sit on Linear and convolution layers
        stored.append(w.detach().clone())
        with torch.no_grad():
            for step in read_noise:
                eps = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)
                w.add_((eps * noise_scale(stored[-1], step.noise)).to(w.dtype), alpha=step.level)

    def after(mod: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if read_noise:
            w = mod.weight
            assert isinstance(w, torch.Tensor)
            with torch.no_grad():
                w.copy_(stored.pop())
        for converter in converters:
            output = converter.quantize(output)
        return output

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robusttrain.noise.pcm import PCM
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
    "inference_steps",
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

    @property
    def random(self) -> bool:
        """Whether two draws of this step can differ: never (quantization is deterministic)."""
        return False


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

    @property
    def random(self) -> bool:
        """Whether two draws of this step can differ (p > 0)."""
        return self.p > 0

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

    @property
    def random(self) -> bool:
        """Whether two draws of this step can differ (p > 0)."""
        return self.p > 0

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

    @property
    def random(self) -> bool:
        """Whether two draws of this step can differ (level > 0)."""
        return check_noise(self.noise, self.level) > 0


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

    @property
    def random(self) -> bool:
        """Whether two draws of this step can differ: never (rounding is deterministic)."""
        return False

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
        """Whether two device draws can differ (some device step draws at random)."""
        return any(s.random for s in self.device_steps)

    @property
    def random_inference(self) -> bool:
        """Whether two inference draws can differ (read noise with level > 0)."""
        return any(s.random for s in self.steps if s.stage == "inference")

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
    with preserved_state(model):
        deploy_weights_(weights, deployment, _seeded(device_seed, device))
        with inference_steps(model, deployment, _seeded(inference_seed, device)):
            yield model


@contextlib.contextmanager
def inference_steps(
    model: nn.Module, deployment: Any, generator: torch.Generator
) -> Iterator[nn.Module]:
    """Inside the block, every forward pass of ``model`` runs the deployment's inference steps.

    Read noise on each Linear/Conv layer's stored weights (one draw per layer and pass from
    ``generator``, which advances; the stored weights are written back after the pass) and
    output quantization. The device steps are not applied here: ``model`` holds the stored
    weights already (:func:`deployed` applies them first; a chip holds its programmed weights).
    The hooks are removed on exit, also when the body raises.
    """
    deployment = parse_deployment(deployment)
    read_noise = [s for s in deployment.steps if isinstance(s, ReadNoise) and s.level > 0]
    converters = [s for s in deployment.steps if isinstance(s, OutputQuantize)]
    handles = []
    try:
        if read_noise or converters:
            for module in model.modules():
                if isinstance(module, WEIGHT_LAYERS):
                    handles += _hooks(module, read_noise, converters, generator)
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

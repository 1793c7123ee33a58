r"""A chip as a black box: program weights, run a batch, count the queries.

A trainer in the loop with real hardware can do three things with a chip: write its float weights
into it (the chip quantizes them and its faulty cells store what they store), run a batch of
inputs through it (logits come back, read noise drawn anew at every inference), and count what it
has asked. :class:`Chip` is that protocol; :class:`SimulatedChip` is one chip of a
:mod:`robusttrain.noise.deployment` — its device draw (quantization, stuck-at cells, bit flips,
PCM programming) fixed for its life by a seed the trainer never sees — and :class:`ChipPort` is
what a trainer gets: the three operations and nothing else.

Plugging in a real device means writing a subclass of :class:`Chip` with the three members:

* ``program(model)`` — read the float parameters of ``model`` (an ``nn.Module`` of the chip's
  architecture; never modified) and write them into the device;
* ``run(x)`` — one inference of the programmed network on the batch ``x``; logits out, no
  gradient;
* ``queries`` — a :class:`ChipQueries` count: programs, forward passes, examples.

and naming it in the config (``chip: {class_path: mylab.MyChip, init_args: {...}}``).

What the port hides, and how far. A trainer holds a :class:`ChipPort`: it has no attributes but
the three members (``__slots__``, no ``__dict__``), its members are plain functions (no
``__self__`` leading back to the chip), and an unknown attribute raises an error that names the
protocol. So a trainer that reads the fault map, the seeds or the deployment by mistake fails at
once. It is not a sandbox: code in the same process can still walk the interpreter's objects (a
function's closure cells, the garbage collector). A real chip is behind its own driver; the
simulated one is honest by construction, not by force.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robusttrain.noise.deployment import deploy_weights_, inference_steps, parse_deployment
from robusttrain.noise.seeds import pair_seed
from robusttrain.noise.weight import noisy_parameters

__all__ = ["Chip", "ChipPort", "ChipQueries", "SimulatedChip"]


@dataclasses.dataclass(frozen=True)
class ChipQueries:
    """What has been asked of a chip: weight programs, forward passes and examples run."""

    programs: int = 0
    forward_passes: int = 0
    examples: int = 0

    def __add__(self, other: ChipQueries) -> ChipQueries:
        return ChipQueries(self.programs + other.programs,
                           self.forward_passes + other.forward_passes,
                           self.examples + other.examples)

    def __sub__(self, other: ChipQueries) -> ChipQueries:
        return ChipQueries(self.programs - other.programs,
                           self.forward_passes - other.forward_passes,
                           self.examples - other.examples)


class Chip:
    """The protocol of a chip in the loop (subclass it for a real device; see the module docstring)."""

    def program(self, model: nn.Module) -> None:
        """Write ``model``'s float parameters into the chip (``model`` is not modified)."""
        raise NotImplementedError

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one inference of the programmed network on the batch ``x`` (no gradient)."""
        raise NotImplementedError

    @property
    def queries(self) -> ChipQueries:
        """Programs, forward passes and examples asked so far."""
        raise NotImplementedError


class SimulatedChip(Chip):
    """One chip of a deployment: its device draw fixed by ``seed``, fresh read noise per inference.

    ``program`` copies the float parameters into the chip's own copy of the network and applies
    the deployment's device steps with a generator seeded by ``seed`` — anew at every program, so
    the same cells are stuck, the same bits flipped, whatever the weights (the stuck value is the
    programmed range, ±max|W|, as in :class:`robusttrain.noise.deployment.StuckAt`). ``run``
    applies the inference steps (read noise, output converters) from the chip's own generator,
    seeded by ``seed`` and never reset, so no two inferences share read noise. The chip of seed
    ``s`` stores exactly what ``deployed(model, deployment, device_seed=s)`` stores, and its first
    inference after :meth:`program` is that of ``inference_seed = read_seed(s)``
    (:func:`robusttrain.noise.deployment.deployed`); the tests hold it to that.

    Args:
        deployment: anything :func:`robusttrain.noise.deployment.parse_deployment` accepts.
        seed: the chip (integer >= 0); the trainer never learns it.
    """

    def __init__(self, deployment: str | list[dict[str, Any]], seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"chip seed must be an integer >= 0, got {seed!r}")
        self._deployment = parse_deployment(deployment)
        self._seed = seed
        self._network: nn.Module | None = None
        self._reads: torch.Generator | None = None
        self._count = ChipQueries()

    @staticmethod
    def read_seed(seed: int) -> int:
        """Seed of the read-noise generator of the chip with seed ``seed``."""
        return pair_seed(seed, 0x4EAD)

    def program(self, model: nn.Module) -> None:
        if self._network is None:
            self._network = copy.deepcopy(model).eval()
            for p in self._network.parameters():
                p.requires_grad_(False)
        own = dict(self._network.named_parameters())
        given = dict(model.named_parameters())
        if own.keys() != given.keys() or any(own[k].shape != given[k].shape for k in own):
            raise ValueError("program: the model's parameters differ in names or shapes from the "
                             "network this chip was first programmed with; a chip runs one "
                             "architecture")
        device = next(iter(own.values())).device  # the chip stays where it was first programmed
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(given[name].to(device))
            weights = [p for _, p in noisy_parameters(self._network)]
            deploy_weights_(weights, self._deployment,
                            torch.Generator(device=device).manual_seed(self._seed))
        if self._reads is None:
            self._reads = torch.Generator(device=device).manual_seed(self.read_seed(self._seed))
        self._count = dataclasses.replace(self._count, programs=self._count.programs + 1)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self._network is None or self._reads is None:
            raise RuntimeError("run: program the chip first (chip.program(model))")
        device = next(self._network.parameters()).device
        with torch.no_grad(), inference_steps(self._network, self._deployment, self._reads):
            logits = self._network(x.to(device)).to(x.device)
        self._count = dataclasses.replace(self._count,
                                          forward_passes=self._count.forward_passes + 1,
                                          examples=self._count.examples + int(x.shape[0]))
        return logits

    @property
    def queries(self) -> ChipQueries:
        return self._count

    def __repr__(self) -> str:  # names the chip without its seed or its faults
        return f"{type(self).__name__}(<hidden>)"


class ChipPort:
    """What a trainer holds of a chip: ``program``, ``run``, ``queries`` and nothing else.

    Built from any :class:`Chip`; the chip itself is reachable only through the closures of the
    three members (see the module docstring for what that does and does not guarantee).
    """

    __slots__ = ("_program_fn", "_run_fn", "_queries_fn")

    _program_fn: Callable[[nn.Module], None]
    _run_fn: Callable[[torch.Tensor], torch.Tensor]
    _queries_fn: Callable[[], ChipQueries]

    def __init__(self, chip: Chip) -> None:
        if not isinstance(chip, Chip):
            raise TypeError(f"a chip must be a robusttrain.noise.chip.Chip (program, run, "
                            f"queries), got {type(chip).__name__}")

        def program(model: nn.Module) -> None:
            chip.program(model)

        def run(x: torch.Tensor) -> torch.Tensor:
            return chip.run(x)

        def queries() -> ChipQueries:
            return chip.queries

        object.__setattr__(self, "_program_fn", program)
        object.__setattr__(self, "_run_fn", run)
        object.__setattr__(self, "_queries_fn", queries)

    def program(self, model: nn.Module) -> None:
        """Write ``model``'s float parameters into the chip."""
        self._program_fn(model)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of one inference of the programmed network on ``x``."""
        return self._run_fn(x)

    @property
    def queries(self) -> ChipQueries:
        """Programs, forward passes and examples asked so far."""
        return self._queries_fn()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a chip in the loop offers program, run and queries only; "
                             f"{name!r} is hidden from the trainer")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a chip port cannot be changed")

    def __repr__(self) -> str:
        return "ChipPort(program, run, queries)"

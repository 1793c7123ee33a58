r"""Population-parallel estimates: the processes split the *pairs*, and exchange only their losses.

Every direction z_i is a function of (seed, i) (:mod:`robusttrain.noise.seeds`), so a process
that knows the N antithetic loss pairs (L(θ+σz_i), L(θ−σz_i)) can rebuild the whole estimate
ĝ = Σ_i c_i z_i by itself (Salimans et al. 2017). With W processes, process k

1. evaluates its own share of the pairs (:func:`pair_share`: contiguous, sizes differing by at
   most one, so N need not be divisible by W) on the whole batch — :func:`loop_pair_losses`
   (in place) or :func:`engine_pair_losses` (the batched population engine);
2. all-gathers the losses (:func:`gather_pair_losses`): 2N float64 numbers, whatever the size d
   of the network, instead of the d-float all-reduce of data parallelism;
3. rebuilds ĝ from the N seeds and the losses (:func:`rebuild_estimate`), identically on every
   process, so every process takes the same optimizer step on its own copy of θ.

Step 3 costs every process O(N·d) for Gaussian directions and O(N·(in + out)·r) per weight
matrix for low-rank ones (docs/scaling.md); orthogonal directions add the QR of the whole block on
every process, O(d·N) more memory and O(d·N²) time for Gaussian ones (docs/theory.md §15).
The same three steps in one process (W = 1) give the same numbers as W processes: with
:func:`loop_pair_losses` every loss is one ordinary forward pass whatever process computes it, so
a run ends bit for bit where the single-process run ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from robusttrain.noise.seeds import pair_seed
from robusttrain.zo.arguments import Sigmas, check_estimator_args, flat_sigmas, loss_value, per_tensor
from robusttrain.zo.coefficients import NonFiniteLossError, pair_coefficients
from robusttrain.zo.perturbations import Perturbation
from robusttrain.zo.population import (
    _ROWS_PER_CHUNK,
    _member_losses,
    _require_supported,
    _trainable,
    split_rows,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "PARALLEL_MODES",
    "all_gather_rows",
    "engine_pair_losses",
    "gather_pair_losses",
    "loop_pair_losses",
    "pair_share",
    "rebuild_estimate",
]

PARALLEL_MODES = ("data", "population")
_REBUILD_FLOATS = 1 << 22  # directions materialized at once while rebuilding (16 MB of float32)


def pair_share(num_pairs: int, world_size: int, rank: int) -> tuple[int, int]:
    """Pairs ``start … stop − 1`` of process ``rank``: contiguous, as even as possible.

    The first ``num_pairs % world_size`` processes get one pair more; a process gets none when
    there are fewer pairs than processes.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} processes")
    base, extra = divmod(int(num_pairs), world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _scale(sigma: float | Sigmas) -> float:
    """The σ of the coefficients: σ itself, or 1 when the scales go into the directions."""
    return 1.0 if per_tensor(sigma) else float(sigma)


def loop_pair_losses(
    loss_fn: Callable[..., torch.Tensor | float],
    params: Sequence[torch.Tensor],
    *,
    sigma: float | Sigmas,
    num_pairs: int,
    seed: int,
    start: int,
    stop: int,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
    pair_loss: bool = False,
) -> torch.Tensor:
    """L(θ ± σ⊙z_i) for pairs ``start … stop − 1``, by perturbing ``params`` in place.

    The directions are those of :func:`robusttrain.zo.estimators.estimate_smoothed_grad` with the
    same ``seed``, ``num_pairs`` and family (``perturbation``, ``rank``, ``orthogonal``: an
    orthogonal block is drawn whole on every process, then sliced); the parameters are restored
    bit for bit, also on an error.
    A NaN or infinite loss is returned as it is (not raised), so that every process reaches the
    exchange; :func:`rebuild_estimate` then raises on every process alike.

    Returns:
        (stop − start, 2) float64: column 0 the losses at θ + σz_i, column 1 at θ − σz_i.
    """
    params = list(params)
    check_estimator_args(params, sigma, num_pairs, seed, "antithetic")
    family = Perturbation(perturbation, rank, orthogonal)
    sizes = [p.numel() for p in params]
    flat_sigma = flat_sigmas(params, sigma, family) if per_tensor(sigma) else None
    scale = _scale(sigma)
    clean = [p.detach().clone() for p in params]
    noise = torch.empty(sum(sizes), device=params[0].device, dtype=torch.float32)
    step = noise if flat_sigma is None else torch.empty_like(noise)
    step_views = [z.view(p.shape) for z, p in zip(step.split(sizes), params)]
    block = family.draw_block(params, seed, num_pairs) if family.drawn_as_block else None
    generator = torch.Generator(device=params[0].device)
    losses = torch.empty(stop - start, 2, dtype=torch.float64)
    try:
        with torch.no_grad():
            for row, i in enumerate(range(start, stop)):
                if block is not None:
                    family.dense(params, block[i], out=noise)
                else:
                    generator.manual_seed(pair_seed(seed, i))
                    family.draw(params, generator, out=noise)
                if flat_sigma is not None:
                    torch.mul(noise, flat_sigma, out=step)
                for column, sign in enumerate((1.0, -1.0)):
                    torch._foreach_copy_(params, clean)
                    torch._foreach_add_(params, step_views, alpha=sign * scale)
                    call = (lambda pair=i: loss_fn(pair)) if pair_loss else loss_fn
                    try:
                        losses[row, column] = loss_value(call, i, "+" if sign > 0 else "-")
                    except NonFiniteLossError as err:
                        # kept, not raised: every process must reach the exchange, and then
                        # every process raises on the same losses (rebuild_estimate)
                        assert err.value is not None  # loss_value always names the value
                        losses[row, column] = err.value
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, clean)
    return losses


def engine_pair_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float | Sigmas,
    num_pairs: int,
    seed: int,
    start: int,
    stop: int,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
    batch_mode: str = "shared",
) -> torch.Tensor:
    """:func:`loop_pair_losses` for a model the population engine supports, in batched passes.

    ``batch_mode="split"`` gives pair i the rows ``split_rows(B, num_pairs)[i]``, as in a
    single-process split step. Returns (stop − start, 2) float64 losses.
    """
    params = _trainable(model)
    check_estimator_args(params, sigma, num_pairs, seed, "antithetic")
    family = Perturbation(perturbation, rank, orthogonal)
    _require_supported(model, family)
    sigmas = list(sigma) if per_tensor(sigma) else None
    rows = split_rows(x.shape[0], num_pairs, x.device) if batch_mode == "split" else None
    per_pair = 2 * (x.shape[0] if rows is None else rows.shape[1])
    chunk = max(1, _ROWS_PER_CHUNK // per_pair) if rows is None else max(1, stop - start)
    out = torch.empty(stop - start, 2, dtype=torch.float64)
    # a low-rank or orthogonal block is drawn whole whatever the slice: once, not per chunk
    whole = family.draw_block(params, seed, num_pairs) if family.drawn_as_block else None
    with torch.no_grad():
        for first in range(start, stop, chunk):
            last = min(stop, first + chunk)
            z = (whole[first:last] if whole is not None
                 else family.draw_block(params, seed, num_pairs, first, last))
            plus, minus = _member_losses(model, x, y, z, _scale(sigma), family, True,
                                         None if rows is None else rows[first:last], sigmas)
            assert minus is not None  # antithetic: both signs were evaluated
            out[first - start : last - start, 0] = plus.double().cpu()
            out[first - start : last - start, 1] = minus.double().cpu()
    return out


def gather_pair_losses(
    local: torch.Tensor, num_pairs: int, group: ProcessGroup | None = None
) -> torch.Tensor:
    """All processes' losses, (num_pairs, 2), in pair order, on every process.

    ``local`` holds this process's share (:func:`pair_share`). One ``all_gather_into_tensor``
    of ⌈N/W⌉·2 float64 per process (shares are padded to the largest; :func:`all_gather_rows`).
    Without an initialized
    process group (or with one process) ``local`` is returned.
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return local
    world = distributed.get_world_size(group)
    if world == 1:
        return local
    largest = pair_share(num_pairs, world, 0)[1]
    backend = distributed.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    padded = torch.zeros(largest, 2, dtype=torch.float64, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = all_gather_rows(padded, group).view(world, largest, 2).cpu()
    parts = []
    for rank in range(world):
        start, stop = pair_share(num_pairs, world, rank)
        parts.append(gathered[rank, : stop - start])
    return torch.cat(parts)


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Every process's ``tensor`` (the same shape on each) stacked along a new first dimension.

    One collective: ``all_gather_single`` (``all_gather_into_tensor`` where torch lacks it).
    """
    distributed = torch.distributed
    world = distributed.get_world_size(group)
    out = torch.empty(world * tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype,
                      device=tensor.device)
    gather = getattr(distributed, "all_gather_single", None) or distributed.all_gather_into_tensor
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, *tensor.shape)


def rebuild_estimate(
    params: Sequence[torch.Tensor],
    losses: torch.Tensor,
    *,
    sigma: float | Sigmas,
    seed: int,
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
) -> list[torch.Tensor]:
    """ĝ = Σ_i c_i z_i (÷ σ elementwise for per-tensor scales) from all N pairs' losses.

    The coefficients are :func:`~robusttrain.zo.coefficients.pair_coefficients` of the antithetic
    estimator; the directions are regenerated from ``seed`` in blocks of pairs. The result is the
    estimate of :func:`~robusttrain.zo.estimators.estimate_smoothed_grad` with the same arguments,
    up to float rounding (it sums in another order).

    Args:
        params: the tensors the losses were evaluated for (only their shapes and device are used).
        losses: (N, 2) float64, column 0 at θ + σz_i, column 1 at θ − σz_i.
        sigma, seed, fitness_shaping, perturbation, rank, orthogonal: as in the estimate that made
            the losses.

    Raises:
        NonFiniteLossError: a loss is NaN or infinite (every process raises it, on the same losses).
    """
    params = list(params)
    num_pairs = losses.shape[0]
    family = Perturbation(perturbation, rank, orthogonal)
    flat_sigma = flat_sigmas(params, sigma, family) if per_tensor(sigma) else None
    c = pair_coefficients(losses[:, 0], losses[:, 1], sigma=_scale(sigma),
                          estimator="antithetic", fitness_shaping=fitness_shaping)
    grads = [torch.zeros(p.shape, device=p.device, dtype=torch.float32) for p in params]
    chunk = max(1, _REBUILD_FLOATS // max(1, family.num_factors(params)))
    whole = family.draw_block(params, seed, num_pairs) if family.drawn_as_block else None
    for first in range(0, num_pairs, chunk):
        last = min(num_pairs, first + chunk)
        z = (whole[first:last] if whole is not None
             else family.draw_block(params, seed, num_pairs, first, last))
        torch._foreach_add_(grads, family.combine(params, c[first:last], z))
    if flat_sigma is not None:
        sizes = [p.numel() for p in params]
        for g, s in zip(grads, flat_sigma.split(sizes)):
            g.div_(s.view(g.shape))
    return [g.to(p.dtype) for g, p in zip(grads, params)]

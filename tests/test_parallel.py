"""Population-parallel zeroth-order steps: the pieces (share, losses, exchange, rebuild) match the
single-process estimator, and real multi-process runs end where the one-process run ends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robusttrain.models import MLP
from robusttrain.zo import estimate_smoothed_grad
from robusttrain.zo.estimators import NonFiniteLossError
from robusttrain.zo.parallel import (
    engine_pair_losses,
    gather_pair_losses,
    loop_pair_losses,
    pair_share,
    rebuild_estimate,
)
from robusttrain.zo.population import split_rows

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("num_pairs", [1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pair_share_partitions_the_pairs_evenly(num_pairs, world):
    shares = [pair_share(num_pairs, world, rank) for rank in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == num_pairs
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in rank order
    sizes = [stop - start for start, stop in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_pair_share_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not one of 2 processes"):
        pair_share(4, 2, 2)


def _problem():
    torch.manual_seed(0)
    model = MLP(20, [16], 5)
    x, y = torch.randn(24, 20), torch.randint(0, 5, (24,))
    return model, x, y, list(model.parameters())


SIGMAS = {"scalar": 0.05, "per_tensor": [0.05, 0.02, 0.03, 0.01]}


@pytest.mark.parametrize("perturbation", ["gaussian", "lowrank"])
@pytest.mark.parametrize("sigma", sorted(SIGMAS))
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shares_of_the_loop_are_the_estimators_losses_and_rebuild_its_estimate(
        perturbation, sigma, world):
    model, x, y, params = _problem()
    before = [p.detach().clone() for p in params]
    sigma = SIGMAS[sigma]
    common = {"sigma": sigma, "num_pairs": 7, "seed": 3, "perturbation": perturbation}
    reference = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, **common)
    losses = torch.cat([
        loop_pair_losses(lambda: F.cross_entropy(model(x), y), params,
                         start=start, stop=stop, **common)
        for start, stop in (pair_share(7, world, rank) for rank in range(world))
    ])
    # every loss is one ordinary forward pass of the same perturbed network: bit for bit
    assert torch.equal(losses[:, 0], reference.losses_plus)
    assert torch.equal(losses[:, 1], reference.losses_minus)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # restored
    grads = rebuild_estimate(params, losses, seed=3, sigma=sigma, perturbation=perturbation)
    for g, want in zip(grads, reference.grads):
        # the same Σ c_i z_i summed in another order: float32 rounding of N terms
        scale = want.abs().max()
        torch.testing.assert_close(g, want, rtol=0, atol=float(1e-6 * scale * 7))


def test_split_batches_use_the_single_process_rows():
    model, x, y, params = _problem()
    rows = split_rows(x.shape[0], 6, x.device)
    common = {"sigma": 0.05, "num_pairs": 6, "seed": 1}
    reference = estimate_smoothed_grad(
        lambda i: F.cross_entropy(model(x[rows[i]]), y[rows[i]]), params, pair_loss=True, **common)
    losses = torch.cat([
        loop_pair_losses(lambda i: F.cross_entropy(model(x[rows[i]]), y[rows[i]]), params,
                         pair_loss=True, start=start, stop=stop, **common)
        for start, stop in (pair_share(6, 4, rank) for rank in range(4))
    ])
    assert torch.equal(losses[:, 0], reference.losses_plus)
    engine = torch.cat([engine_pair_losses(model, x, y, batch_mode="split", start=a, stop=b,
                                           **common) for a, b in [(0, 4), (4, 6)]])
    torch.testing.assert_close(engine, losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("perturbation", ["gaussian", "lowrank"])
def test_engine_shares_match_the_loop_to_float_rounding(perturbation):
    model, x, y, params = _problem()
    common = {"sigma": [0.05, 0.02, 0.03, 0.01], "num_pairs": 5, "seed": 9,
              "perturbation": perturbation}
    loop = loop_pair_losses(lambda: F.cross_entropy(model(x), y), params, start=0, stop=5, **common)
    engine = torch.cat([engine_pair_losses(model, x, y, start=a, stop=b, **common)
                        for a, b in [(0, 3), (3, 5)]])
    torch.testing.assert_close(engine, loop, rtol=1e-5, atol=1e-6)


def test_a_nonfinite_loss_reaches_the_exchange_and_then_stops_every_process():
    model, x, y, params = _problem()
    before = [p.detach().clone() for p in params]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    losses = loop_pair_losses(lambda: F.cross_entropy(model(x_bad), y), params, sigma=0.05,
                              num_pairs=3, seed=0, start=0, stop=3)
    assert torch.isnan(losses).all()  # returned, not raised: the other processes are waiting
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    with pytest.raises(NonFiniteLossError, match="the loss is nan at pair 0"):
        rebuild_estimate(params, losses, sigma=0.05, seed=0)


def test_gather_without_a_process_group_returns_the_local_losses():
    local = torch.randn(4, 2, dtype=torch.float64)
    assert gather_pair_losses(local, 4) is local

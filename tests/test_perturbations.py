"""Perturbation families: layout, the low-rank directions' moments, and what they estimate."""

import math

import pytest
import torch

from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.zo.estimators import estimate_smoothed_grad
from robusttrain.zo.perturbations import LowRankFactors, Perturbation


def tensors():
    torch.manual_seed(0)
    return [torch.randn(5, 7), torch.randn(5), torch.randn(4, 3, 2, 2), torch.randn(4)]


def test_gaussian_factors_are_draw_noise():
    params = tensors()
    family = Perturbation("gaussian")
    a = family.draw(params, torch.Generator().manual_seed(pair_seed(3, 1)))
    b = draw_noise(params, torch.Generator().manual_seed(pair_seed(3, 1)))
    assert torch.equal(a, b)
    assert family.dense(params, a) is a  # no copy for the reference family
    assert family.num_factors(params) == sum(p.numel() for p in params)


@pytest.mark.parametrize("rank", [1, 3])
def test_lowrank_layout_and_dense_direction(rank):
    params = tensors()
    family = Perturbation("lowrank", rank)
    # matrices get (out + in)·r factors, a conv kernel is out × in·k·k, vectors stay dense
    assert family.factor_sizes(params) == [(5 + 7) * rank, 5, (4 + 12) * rank, 4]
    factors = family.draw(params, torch.Generator().manual_seed(0))
    parts = family.split(params, factors[None])
    dense = family.dense(params, factors)
    w = parts[0]
    assert isinstance(w, LowRankFactors) and w.a.shape == (1, 5, rank) and w.b.shape == (1, 7, rank)
    expected_w = w.a[0] @ w.b[0].T / math.sqrt(rank)
    assert torch.allclose(dense[:35].view(5, 7), expected_w, atol=1e-6)
    assert torch.equal(dense[35:40], parts[1][0])
    k = parts[2]
    expected_k = (k.a[0] @ k.b[0].T / math.sqrt(rank)).view(4, 3, 2, 2)
    assert torch.allclose(dense[40:88].view(4, 3, 2, 2), expected_k, atol=1e-6)
    # the matrix really has rank r
    assert torch.linalg.matrix_rank(dense[:35].view(5, 7)) == rank


@pytest.mark.parametrize("kind", ["gaussian", "lowrank"])
def test_combine_is_the_weighted_sum_of_dense_directions(kind):
    params = tensors()
    family = Perturbation(kind, 2)
    g = torch.Generator().manual_seed(1)
    factors = torch.stack([family.draw(params, g) for _ in range(6)])
    c = torch.randn(6, dtype=torch.float64)
    combined = torch.cat([t.flatten() for t in family.combine(params, c, factors)])
    dense = torch.stack([family.dense(params, f).clone() for f in factors])
    assert torch.allclose(combined, c.float() @ dense, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4])
def test_lowrank_entries_have_identity_covariance_and_excess_kurtosis_6_over_r(rank):
    # E = A Bᵀ/√r: E[E_ab] = 0, E[E_ab E_cd] = δ_ac δ_bd, E[E_ab⁴] = 3 + 6/r
    family = Perturbation("lowrank", rank)
    shape = [torch.empty(3, 4)]
    n = 40000
    g = torch.Generator().manual_seed(7)
    factors = torch.randn(n, family.num_factors(shape), generator=g)
    parts = family.split(shape, factors)[0]
    e = (torch.bmm(parts.a, parts.b.transpose(1, 2)) * parts.scale).flatten(1).double()  # (n, 12)
    second = e.T @ e / n  # estimated E[E_ab E_cd]
    # sd of a mean of n products: E_ab² has variance 2 + 6/r; a cross product at most 3 (r = 1)
    diag_sd = math.sqrt((2 + 6 / rank) / n)
    off_sd = math.sqrt(3 / n)
    assert (second.diagonal() - 1).abs().max() < 5 * diag_sd
    off = second - torch.diag(second.diagonal())
    assert off.abs().max() < 5 * off_sd
    assert e.mean(0).abs().max() < 5 * math.sqrt(1 / n)
    # fourth moment: for r = 1, E[(AB)⁸] = 105² bounds the variance of E⁴
    fourth = e.pow(4).mean(0)
    fourth_sd = math.sqrt((105**2) / n)
    assert (fourth - (3 + 6 / rank)).abs().max() < 5 * fourth_sd


def _unbiased_check(loss, params, truth, *, perturbation, rank, sigma, num_pairs, seeds,
                    orthogonal=False):
    """|mean − truth| ≤ 5 standard errors, with the sd measured across independent seeds."""
    estimates = torch.stack([
        torch.cat([g.flatten() for g in estimate_smoothed_grad(
            loss, params, sigma=sigma, num_pairs=num_pairs, seed=s, perturbation=perturbation,
            rank=rank, orthogonal=orthogonal).grads]).double()
        for s in range(seeds)
    ])
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(seeds)
    z = (mean - truth) / se
    return z.abs().max()


@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("rank", [1, 2])
def test_lowrank_is_unbiased_for_a_quadratic(rank, orthogonal):
    # L(W, b) = ½‖W − T‖²_H + ‖b − u‖²: L_σ differs from L by a constant, so ∇L_σ = ∇L, and for
    # the antithetic pair the odd part is exact: the estimate is unbiased for ∇L at any σ. It
    # needs only each direction's identity covariance, which orthogonal directions keep
    # (docs/theory.md §15)
    g = torch.Generator().manual_seed(0)
    w, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    h = torch.rand(4, 6, generator=g) + 0.5
    b, u = torch.randn(3, generator=g), torch.randn(3, generator=g)

    def loss():
        return 0.5 * (h * (w - t) ** 2).sum() + ((b - u) ** 2).sum()

    truth = torch.cat([(h * (w - t)).flatten(), (2 * (b - u))]).double()
    z = _unbiased_check(loss, [w, b], truth, perturbation="lowrank", rank=rank, sigma=0.3,
                        num_pairs=50, seeds=40, orthogonal=orthogonal)
    # 27 coordinates at 5 standard errors (t with 39 dof): a false alarm is far below 1e-3
    assert z < 5


def test_lowrank_estimate_of_a_cosine_has_its_closed_form_and_approaches_gaussian_with_rank():
    # an entry of E = A Bᵀ/√r has characteristic function φ(t) = (1 + t²/r)^(−r/2). For
    # L = Σ cos w the antithetic estimate has mean −sin w · E[E sin(σE)]/σ = −sin w · (−φ'(σ)/σ)
    # = −sin w · (1 + σ²/r)^(−(r+2)/2), against −sin w · exp(−σ²/2) for Gaussian directions
    # (the r → ∞ limit). Unlike the Gaussian case it is not the gradient of E[L(w + σE)]
    # (Stein's identity needs Gaussian noise); both agree with ∇L_σ to first order in σ².
    sigma = 1.0
    w = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.5, -0.7]])

    def loss():
        return torch.cos(w).sum()

    gaussian = (-torch.sin(w) * math.exp(-sigma**2 / 2)).flatten().double()
    gaps = []
    for rank in (1, 4, 16):
        expected = (-torch.sin(w) * (1 + sigma**2 / rank) ** (-(rank + 2) / 2)).flatten().double()
        z = _unbiased_check(loss, [w], expected, perturbation="lowrank", rank=rank, sigma=sigma,
                            num_pairs=400, seeds=30)
        assert z < 5
        # the measured gap to the Gaussian-smoothed gradient
        measured = torch.cat([g.flatten() for g in estimate_smoothed_grad(
            loss, [w], sigma=sigma, num_pairs=20000, seed=99, perturbation="lowrank", rank=rank
        ).grads]).double()
        gaps.append(float((measured - gaussian).abs().max()))
    # exact gaps 0.24, 0.088, 0.026 (times max |sin w| = 0.93); the estimates' sd is ≈ 0.01
    assert gaps[0] > gaps[1] > gaps[2]


@pytest.mark.parametrize("bad", [dict(kind="sparse"), dict(kind="lowrank", rank=0),
                                 dict(kind="lowrank", rank=1.5), dict(kind="lowrank", rank=True)])
def test_bad_family_arguments(bad):
    with pytest.raises(ValueError, match="perturbation|rank"):
        Perturbation(**bad)

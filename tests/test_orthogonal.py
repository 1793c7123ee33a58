"""Orthogonal directions (Choromanski et al. 2018): exactly orthogonal within a group, each still
marginally N(0, I), the same mean of the estimator, a lower variance, and the same directions on
every path (in-place loop, population engine, population-parallel rebuild).

The statistical checks follow tests/test_estimators.py: M independent estimates (seeds 0..M−1), a
tolerance of K standard errors measured from the samples themselves, K from a Bonferroni bound on a
false-alarm rate of 1e-4 over the checks of a test, and a wrong target that the same check must
reject. The seeds are fixed, so every test is deterministic.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_estimators import COS_TRUTH, SIGMA, THETA, K, many_estimates, within

from robusttrain.models import MLP
from robusttrain.zo.estimators import estimate_smoothed_grad, pair_coefficients, smoothed_loss_grad
from robusttrain.zo.parallel import engine_pair_losses, loop_pair_losses, rebuild_estimate
from robusttrain.zo.perturbations import LowRankFactors, Perturbation, orthogonalize_rows
from robusttrain.zo.population import population_smoothed_grad

pytestmark = pytest.mark.usefixtures("single_thread")


def tensors():
    torch.manual_seed(0)
    return [torch.randn(5, 7), torch.randn(5), torch.randn(4, 3, 2, 2), torch.randn(4)]


def max_group_cosine(rows: torch.Tensor, group: int) -> float:
    """Largest |cos| between two different rows of one group of ``group`` consecutive rows."""
    worst = 0.0
    for start in range(0, rows.shape[0], group):
        g = rows[start : start + group].double()
        unit = g / g.norm(dim=1, keepdim=True)
        cos = unit @ unit.T - torch.eye(len(g), dtype=torch.float64)
        worst = max(worst, float(cos.abs().max()))
    return worst


# --- (1) the block is exactly orthogonal, with chi norms -------------------------------------------


@pytest.mark.parametrize("num_pairs", [10, 92, 200])  # fewer than, as many as, more than d = 92
def test_gaussian_block_is_orthogonal_in_groups_of_d_with_varying_norms(num_pairs):
    params = tensors()
    family = Perturbation("gaussian", 1, True)
    d = family.num_factors(params)
    block = family.draw_block(params, 3, num_pairs)
    assert block.shape == (num_pairs, d)
    # float32 QR: orthogonal to rounding (|cos| ~ 1e-7 measured), against |cos| ≈ 1/√d = 0.1
    # between independent Gaussian vectors
    assert max_group_cosine(block, d) < 1e-5
    if num_pairs > d:  # the groups are independent: rows of different groups are not orthogonal
        unit = block / block.norm(dim=1, keepdim=True)
        assert float((unit[:d] @ unit[d:].T).abs().max()) > 0.1
    norms = block.double().norm(dim=1)
    # chi_d norms, not all √d: their sd is ≈ 1/√2 = 0.71; here ≥ 10 of them
    assert float(norms.std()) > 0.3
    assert float((norms - math.sqrt(d)).abs().max()) > 0.5
    # the first row of a group is the i.i.d. draw itself, to rounding (Gram–Schmidt keeps it)
    raw = Perturbation("lowrank", 1).draw_block([torch.empty(d)], 3, num_pairs)  # same randn
    assert torch.allclose(block[0], raw[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
def test_lowrank_factors_are_orthogonal_per_tensor(rank):
    params = tensors()
    family = Perturbation("lowrank", rank, True)
    n = 5
    parts = family.split(params, family.draw_block(params, 1, n))
    for p, part in zip(params, parts):
        if isinstance(part, LowRankFactors):
            out_f, in_f = part.a.shape[1], part.b.shape[1]
            # the N·r columns of A (out × N·r, pair-major) in groups of out, of B in groups of in
            a_cols = part.a.transpose(1, 2).reshape(n * rank, out_f)
            b_cols = part.b.transpose(1, 2).reshape(n * rank, in_f)
            assert max_group_cosine(a_cols, out_f) < 1e-5
            assert max_group_cosine(b_cols, in_f) < 1e-5
            assert float(a_cols.norm(dim=1).std()) > 0.1  # chi norms, not a constant
        else:  # a vector's N directions, in groups of its size
            assert max_group_cosine(part.reshape(n, -1), p.numel()) < 1e-5


def test_orthogonalize_rows_keeps_norms_and_span():
    g = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = orthogonalize_rows(g)
    assert torch.allclose(q.norm(dim=1), g.norm(dim=1))
    # group rows 0..2 span what g's rows span, and row k is in the span of g's rows up to k
    # (Gram–Schmidt); the last group is row 6 alone, left as it was
    assert torch.allclose(q[6], g[6])
    assert torch.allclose(q[3], g[3])
    coef = torch.linalg.solve(g[3:6].T, q[3:6].T)  # q_k = Σ_j coef[j, k] g_j
    assert torch.allclose(coef.tril(-1), torch.zeros(3, 3, dtype=torch.float64), atol=1e-12)


# --- (2) each direction is marginally N(0, I) -------------------------------------------------------


def moment_zscores(samples: torch.Tensor) -> tuple[float, float]:
    """Largest |z| of the means against 0 and of the second moments E[x_a x_b] against δ_ab.

    samples: (M, d) independent draws; each standard error is the samples' own sd / √M.
    """
    m, d = samples.shape
    mean_z = samples.mean(0) / (samples.std(0) / math.sqrt(m))
    products = (samples[:, :, None] * samples[:, None, :]).flatten(1)  # (M, d²)
    eye = torch.eye(d, dtype=samples.dtype).flatten()
    second_z = (products.mean(0) - eye) / (products.std(0) / math.sqrt(m))
    return float(mean_z.abs().max()), float(second_z.abs().max())


M_MARGINAL = 4000
# checks per test: 6 row positions × (4 means + 16 second moments + 1 norm variance) ≈ 130; a
# false alarm of 1e-4 over them needs Φ⁻¹(1 − 1e-4/260) = 4.9 (Bonferroni, two-sided): K = 5. With
# M = 4000 the sample means of these light-tailed products are normal to well within that.
K_MARGINAL = 5.0


def test_gaussian_orthogonal_rows_are_standard_normal():
    # d = 4, N = 6: groups of rows 0–3 and 4–5; every row position is checked separately over
    # M seeds (independent draws of the block)
    family = Perturbation("gaussian", 1, True)
    params = [torch.empty(2, 2)]
    rows = torch.stack([family.draw_block(params, s, 6) for s in range(M_MARGINAL)]).double()
    for i in range(6):
        z = rows[:, i]
        mean_z, second_z = moment_zscores(z)
        assert mean_z < K_MARGINAL and second_z < K_MARGINAL, (i, mean_z, second_z)
        # ‖z‖² is chi-square with d = 4 degrees of freedom: variance 2d = 8; a fixed norm √d
        # (orthogonal rows rescaled to √d) would have variance 0, 8/se ≈ 30 standard errors off
        sq = (z**2).sum(1)
        q = (sq - sq.mean()) ** 2
        variance, se = float(q.sum() / (len(q) - 1)), float(q.std() / math.sqrt(len(q)))
        assert abs(variance - 8) <= K_MARGINAL * se, (i, variance, se)
        assert variance > K_MARGINAL * se


@pytest.mark.parametrize("rank", [1, 2])
def test_lowrank_orthogonal_directions_have_mean_zero_and_identity_covariance(rank):
    # W (3 × 4) and a bias (3): for N = 4 pairs of rank r, A has 4r columns in groups of 3, B
    # 4r in groups of 4, the bias 4 directions in groups of 3. Pairs 0 and 3 (a pair of the
    # second A group) over M seeds: mean 0 and E[E E^T] = I on all 15 entries.
    # 2 pairs × (15 + 225) checks: Φ⁻¹(1 − 1e-4/960) = 5.2; K = 5.5
    family = Perturbation("lowrank", rank, True)
    params = [torch.empty(3, 4), torch.empty(3)]
    m = 2000
    blocks = torch.cat([family.draw_block(params, s, 4) for s in range(m)])  # (M·4, F)
    w, bias = family.split(params, blocks)
    assert isinstance(w, LowRankFactors)
    e = torch.bmm(w.a, w.b.transpose(1, 2)) * w.scale  # (M·4, 3, 4)
    dense = torch.cat([e.flatten(1), bias], dim=1).view(m, 4, 15).double()
    for i in (0, 3):
        mean_z, second_z = moment_zscores(dense[:, i])
        assert mean_z < 5.5 and second_z < 5.5, (i, mean_z, second_z)


# --- (3) the estimator keeps its mean -----------------------------------------------------------

# the closed forms, the estimate helpers and the tolerance K of tests/test_estimators.py, with
# orthogonal=True passed through to smoothed_loss_grad


@pytest.mark.parametrize("estimator,num_pairs", [("antithetic", 4), ("antithetic", 7),
                                                 ("one_sided", 7), ("plain", 7)])
def test_unbiased_for_the_smoothed_cosine(estimator, num_pairs):
    # N = 4 < d = 5 (one group) and N = 7 (groups of 5 and 2); each z_i is N(0, I) and ĝ is linear
    # in the pairs' terms, so E[ĝ] = ∇L_σ whatever the dependence between the z_i
    est = many_estimates(lambda t: (lambda: torch.cos(t).sum()), THETA, 1000, sigma=SIGMA,
                         num_pairs=num_pairs, estimator=estimator, orthogonal=True)
    assert within(est, COS_TRUTH)
    # the unsmoothed −sin θ is ≥ 0.31 away per coordinate; s ≤ 0.75 here (measured), s/√M ≤ 0.024
    assert not within(est, -torch.sin(THETA))


def test_unbiased_for_a_quadratic():
    # L = ½θᵀAθ + bᵀθ has ∇L_σ = Aθ + b; N = d = 3, one full group
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.4, 0.2], dtype=torch.float64)
    theta = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    est = many_estimates(lambda t: (lambda: 0.5 * t @ a @ t + b @ t), theta, 1000, sigma=0.3,
                         num_pairs=3, orthogonal=True)
    truth = a @ theta + b
    assert within(est, truth)
    # the antithetic difference of a quadratic is exactly linear: ĝ = (1/N)Σ(z_iᵀ∇L)z_i, whose
    # sd per coordinate is ≈ √(2/d)·‖∇L‖/√d ≈ 0.6 here; an offset of 0.2 is ≥ 10 standard errors
    assert not within(est, truth + 0.2)


# --- (4) lower variance --------------------------------------------------------------------------
#
# L(θ) = aᵀθ: the antithetic difference is exact, so ĝ = (1/N) Σ_i (z_iᵀa) z_i. With i.i.d. z_i,
# E[(zᵀa)² zzᵀ] = ‖a‖²I + 2aaᵀ gives Cov(ĝ) = (‖a‖²I + aaᵀ)/N and tr Cov(ĝ) = (d + 1)‖a‖²/N.
# Orthogonal: z_i = ρ_i q_i with ρ_i² ~ χ²_d (E ρ⁴ = d(d + 2)) independent of the orthonormal q_i
# of its group, E(q_iᵀa)² = ‖a‖²/d. Then
#   E‖ĝ‖² = (1/N²) Σ_{i,j} E[(z_iᵀa)(z_jᵀa) z_iᵀz_j]
# has diagonal terms E ρ⁴ ‖a‖²/d = (d + 2)‖a‖², cross terms 0 inside a group (q_iᵀq_j = 0) and
# ‖a‖² between groups (independent, each with mean a). With groups of sizes k_b:
#   tr Cov(ĝ) = E‖ĝ‖² − ‖a‖² = ‖a‖² [(d + 2)/N − Σ_b k_b²/N²]
# (i.i.d. is k_b = 1: (d + 1)/N). For N = d, one full group: 2‖a‖²/d against (d + 1)‖a‖²/d, a
# ratio of 2/(d + 1); for N ≪ d it tends to 1. docs/theory.md §15.

D_LIN = 12


def linear_trace_cov(num_pairs: int, orthogonal: bool, d: int = D_LIN) -> float:
    """tr Cov(ĝ)/‖a‖² of the comment above."""
    if not orthogonal:
        return (d + 1) / num_pairs
    groups = [min(d, num_pairs - s) for s in range(0, num_pairs, d)]
    return (d + 2) / num_pairs - sum(k * k for k in groups) / num_pairs**2


def total_variance_with_se(est):
    """Σ_j s_j² of M estimates and its standard error std(q)/√M, q_m = ‖x_m − x̄‖²."""
    q = ((est - est.mean(0)) ** 2).sum(1)
    return float(q.sum() / (len(est) - 1)), float(q.std() / math.sqrt(len(est)))


@pytest.mark.parametrize("num_pairs", [6, 12, 18])  # N < d, N = d, N = d + d/2
def test_linear_loss_variance_has_its_closed_form_and_is_below_iid(num_pairs):
    a = torch.linspace(-1, 1, D_LIN, dtype=torch.float64) + 0.3
    norm2 = float(a @ a)
    m = 400
    sampled = {}
    theta = torch.zeros(D_LIN, dtype=torch.float64)
    for orthogonal in (False, True):
        est = torch.stack([
            smoothed_loss_grad(lambda: a @ theta, [theta], sigma=0.1, num_pairs=num_pairs,
                               seed=s, orthogonal=orthogonal)[0]
            for s in range(m)
        ])
        total, se = total_variance_with_se(est)
        sampled[orthogonal] = (total, se)
        # 3 N × 2 families = 6 checks: Φ⁻¹(1 − 1e-4/12) = 4.3, K = 4.5
        assert abs(total - norm2 * linear_trace_cov(num_pairs, orthogonal)) <= K * se
    (iid, se_iid), (orth, se_orth) = sampled[False], sampled[True]
    # lower than i.i.d. by more than both standard errors together (predicted ratios 0.62, 0.15,
    # 0.31 for N = 6, 12, 18), and the i.i.d. closed form is rejected for the orthogonal sample
    assert orth + K * (se_orth + se_iid) < iid
    assert abs(orth - norm2 * linear_trace_cov(num_pairs, False)) > K * se_orth


def test_lower_variance_on_a_small_network():
    # an MLP at σ = 1e-3 is locally linear: with a = ∇L (autograd), N = d = 35 the closed form
    # above predicts tr Cov = 2‖a‖²/35 orthogonal against 36‖a‖²/35 i.i.d. (ratio 0.056)
    torch.manual_seed(0)
    model = MLP(4, [4], 3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    assert d == 35
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    norm2 = float(sum((g**2).sum() for g in grad))
    m = 100
    sampled = {}
    for orthogonal in (False, True):
        est = torch.stack([
            torch.cat([g.flatten() for g in smoothed_loss_grad(
                lambda: F.cross_entropy(model(x), y), params, sigma=1e-3, num_pairs=d, seed=s,
                orthogonal=orthogonal)])
            for s in range(m)
        ])
        sampled[orthogonal] = total_variance_with_se(est)
        total, se = sampled[orthogonal]
        # 2 checks: K = 4.5 is generous (Φ⁻¹(1 − 1e-4/4) = 4.1)
        assert abs(total - norm2 * linear_trace_cov(d, orthogonal, d)) <= K * se
    (iid, se_iid), (orth, se_orth) = sampled[False], sampled[True]
    assert orth + K * (se_orth + se_iid) < iid


# --- (5) every path draws the same directions ---------------------------------------------------


def _models():
    torch.manual_seed(0)
    return {
        # d = 421 > N = 7: one group
        "mlp": (MLP(20, [16], 5), torch.randn(24, 20), torch.randint(0, 5, (24,))),
        # d = 14 < N = 16 (Gaussian groups of 14 and 2; A of the 2 × 3 matrix in groups of 2)
        "tiny": (MLP(3, [2], 2), torch.randn(10, 3), torch.randint(0, 2, (10,))),
    }


SIGMAS = {"scalar": 0.05, "per_tensor": [0.05, 0.02, 0.03, 0.01]}


@pytest.mark.parametrize("sigma", sorted(SIGMAS))
@pytest.mark.parametrize("perturbation", ["gaussian", "lowrank"])
@pytest.mark.parametrize("name", ["mlp", "tiny"])
def test_loop_engine_and_rebuild_give_the_same_estimate(name, perturbation, sigma):
    model, x, y = _models()[name]
    params = list(model.parameters())
    num_pairs = 7 if name == "mlp" else 16
    common = dict(sigma=SIGMAS[sigma], num_pairs=num_pairs, seed=3, perturbation=perturbation,
                  rank=2, orthogonal=True)

    def loss():
        return F.cross_entropy(model(x), y)

    reference = estimate_smoothed_grad(loss, params, **common)
    independent = estimate_smoothed_grad(loss, params, **{**common, "orthogonal": False})
    assert not torch.equal(reference.losses_plus, independent.losses_plus)  # the flag is honoured

    def close(grads):
        for g, want in zip(grads, reference.grads):
            # the same Σ c_i z_i; the engine's losses differ by float32 rounding (~1e-6 relative)
            assert torch.allclose(g, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))

    for chunk_size in (None, 3):
        batched = population_smoothed_grad(model, x, y, chunk_size=chunk_size, **common)
        assert torch.allclose(batched.losses_plus, reference.losses_plus, rtol=1e-5, atol=1e-5)
        close(batched.grads)
    shares = [(0, 3), (3, num_pairs)]  # two processes' shares
    loop_losses = torch.cat([loop_pair_losses(loss, params, start=a, stop=b, **common)
                             for a, b in shares])
    # the same ordinary forward passes as the estimator: bit for bit
    assert torch.equal(loop_losses[:, 0], reference.losses_plus)
    assert torch.equal(loop_losses[:, 1], reference.losses_minus)
    rebuild = {k: v for k, v in common.items() if k != "num_pairs"}
    close(rebuild_estimate(params, loop_losses, **rebuild))
    engine_losses = torch.cat([engine_pair_losses(model, x, y, start=a, stop=b, **common)
                               for a, b in shares])
    assert torch.allclose(engine_losses, loop_losses, rtol=1e-5, atol=1e-5)
    close(rebuild_estimate(params, engine_losses, **rebuild))


@pytest.mark.parametrize("perturbation", ["gaussian", "lowrank"])
def test_the_loop_moves_along_the_rows_of_the_block(perturbation):
    # the loss sees exactly clean ± σz_i with z_i the dense direction of draw_block's row i, and
    # ĝ = Σ_i c_i z_i
    model, x, y = _models()["mlp"]
    params = list(model.parameters())
    clean = torch.cat([p.detach().flatten() for p in params])
    seen = []

    def loss():
        seen.append(torch.cat([p.detach().flatten() for p in params]))
        return F.cross_entropy(model(x), y)

    sigma, n, seed = 0.05, 5, 2
    est = estimate_smoothed_grad(loss, params, sigma=sigma, num_pairs=n, seed=seed,
                                 perturbation=perturbation, rank=2, orthogonal=True)
    family = Perturbation(perturbation, 2, True)
    directions = torch.stack([family.dense(params, f).clone()
                              for f in family.draw_block(params, seed, n)])
    expected = [torch.add(clean, z, alpha=s) for z in directions for s in (sigma, -sigma)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == 2 * n
    c = pair_coefficients(est.losses_plus, est.losses_minus, sigma=sigma)
    flat = torch.cat([g.flatten() for g in est.grads])
    assert torch.allclose(flat, c.float() @ directions, rtol=1e-5, atol=1e-6)


# --- (6) a bad flag -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_orthogonal_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="orthogonal must be True or False"):
        Perturbation("gaussian", 1, bad)
    model, x, y = _models()["tiny"]
    params = list(model.parameters())
    common = dict(sigma=0.1, num_pairs=2, seed=0, orthogonal=bad)
    calls = [
        lambda: estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, **common),
        lambda: population_smoothed_grad(model, x, y, **common),
        lambda: loop_pair_losses(lambda: 0.0, params, start=0, stop=2, **common),
        lambda: engine_pair_losses(model, x, y, start=0, stop=2, **common),
        lambda: rebuild_estimate(params, torch.zeros(2, 2, dtype=torch.float64), sigma=0.1,
                                 seed=0, orthogonal=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="orthogonal must be True or False"):
            call()

"""The smoothed-loss gradient estimators against closed forms, with tolerances from their variance.

Unbiasedness tests average M independent estimates (seeds 0..M-1) and check, per coordinate,
|mean − truth| ≤ K·s/√M, with s the empirical standard deviation of the estimates. With d
coordinates and a family-wise false-alarm rate of 1e-4, Bonferroni gives a two-sided normal
quantile of Φ⁻¹(1 − 1e-4/(2d)) = 4.42 for d = 5; K = 4.5. (M is large enough for the mean to be
normal to a good approximation.) Each closed-form test is paired with a wrong target that the same
check must reject, so the tolerance is not so loose that it cannot fail.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from robusttrain.estimators import (
    NonFiniteLossError,
    centered_ranks,
    estimate_smoothed_grad,
    pair_coefficients,
    smoothed_loss_grad,
)
from robusttrain.models import MLP

K = 4.5
THETA = torch.tensor([1.0, -1.2, 2.0, 0.9, -2.2], dtype=torch.float64)  # |sin θ| ≥ 0.78
SIGMA = 0.5  # exp(−σ²/2) = 0.8825: far enough from 1 that the factor is measurable


def cos_loss(theta):
    return lambda: torch.cos(theta).sum()


def many_estimates(make_loss, theta0, m, **options):
    out = []
    for seed in range(m):
        theta = theta0.clone()
        (g,) = smoothed_loss_grad(make_loss(theta), [theta], seed=seed, **options)
        out.append(g)
    return torch.stack(out)


def within(estimates, truth):
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(len(estimates))
    return bool(((mean - truth).abs() <= K * se).all())


# ∇L_σ for L = Σ cos θ_i: E[cos(θ + σg)] = cos θ · exp(−σ²/2), so ∇L_σ = −exp(−σ²/2) sin θ
COS_TRUTH = -math.exp(-(SIGMA**2) / 2) * torch.sin(THETA)


@pytest.mark.parametrize("estimator, m", [("antithetic", 2000), ("one_sided", 2000),
                                          ("plain", 4000)])
def test_unbiased_for_the_smoothed_cosine(estimator, m):
    est = many_estimates(cos_loss, THETA, m, sigma=SIGMA, num_pairs=4, estimator=estimator)
    assert within(est, COS_TRUTH)


def test_the_check_rejects_the_unsmoothed_gradient():
    # −sin θ (no exp factor) differs from the truth by 0.1175·|sin θ| ≥ 0.09, ~9 standard errors
    est = many_estimates(cos_loss, THETA, 2000, sigma=SIGMA, num_pairs=4)
    assert not within(est, -torch.sin(THETA))


A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]], dtype=torch.float64)
B = torch.tensor([0.1, -0.4, 0.2], dtype=torch.float64)
THETA_Q = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)


def quad_loss(theta):
    return lambda: 0.5 * theta @ A @ theta + B @ theta


@pytest.mark.parametrize("estimator", ["antithetic", "one_sided", "plain"])
def test_unbiased_for_a_quadratic_where_smoothing_keeps_the_gradient(estimator):
    # for a quadratic, L_σ = L + σ²/2·tr(A): ∇L_σ = ∇L = Aθ + b exactly
    truth = A @ THETA_Q + B
    est = many_estimates(quad_loss, THETA_Q, 2000, sigma=0.3, num_pairs=4, estimator=estimator)
    assert within(est, truth)
    assert not within(est, truth + 0.5)


def test_smoothed_quadratic_adds_half_sigma_squared_trace():
    # L_σ(θ) = L(θ) + σ²/2·tr(∇²L): the flat-minimum penalty of docs/theory.md
    g = torch.Generator().manual_seed(0)
    sigma, m = 0.3, 200_000
    z = torch.randn(m, 3, generator=g, dtype=torch.float64)
    pts = THETA_Q + sigma * z
    values = 0.5 * ((pts @ A) * pts).sum(1) + pts @ B
    truth = quad_loss(THETA_Q)() + sigma**2 / 2 * torch.trace(A)
    se = values.std() / math.sqrt(m)
    assert abs(values.mean() - truth) <= K * se


def curved_loss(theta):
    return lambda: torch.cos(theta).sum() + (theta**2).sum()


def test_antithetic_has_the_lowest_variance():
    # on a loss with an even (curvature) part, which the pair cancels and a baseline does not
    m = 2000
    var = {
        name: many_estimates(curved_loss, THETA, m, sigma=SIGMA, num_pairs=4, estimator=name)
        .var(0).sum().item()
        for name in ["antithetic", "one_sided", "plain"]
    }
    # a sample variance from m draws has relative sd ≈ sqrt(2/(m−1)) = 3.2% (normal-theory); a
    # 5-sd margin on each side makes the ordering a statement about the estimators, not the sample
    margin = 1 + 5 * math.sqrt(2 / (m - 1))
    assert var["antithetic"] * margin < var["one_sided"] / margin
    assert var["one_sided"] * margin < var["plain"] / margin


def test_second_moment_grows_with_dimension_and_shrinks_with_pairs():
    # for a linear L(θ) = bᵀθ the antithetic estimate is (1/N)Σ(z_iᵀb)z_i and
    # E‖ĝ‖² = ‖b‖²·(1 + (d + 1)/N) exactly (docs/theory.md)
    for d, n in [(50, 4), (50, 16), (10, 4)]:
        b = torch.linspace(-1, 1, d, dtype=torch.float64)
        m = 1500
        est = many_estimates(lambda t, b=b: (lambda: b @ t), torch.zeros(d, dtype=torch.float64),
                             m, sigma=0.1, num_pairs=n)
        sq = (est**2).sum(1) / (b @ b)
        predicted = 1 + (d + 1) / n
        assert abs(sq.mean().item() - predicted) <= K * sq.std().item() / math.sqrt(m), (d, n)


def test_restores_parameters_bit_for_bit_also_when_the_loss_raises():
    model = MLP(6, [5], 3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for fail_at in [1, 4, 8]:  # first, middle, last of 2N = 8 calls
        calls = {"n": 0}

        def loss(calls=calls, fail_at=fail_at):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise RuntimeError("boom")
            return F.cross_entropy(model(x), y)

        with pytest.raises(RuntimeError, match="boom"):
            smoothed_loss_grad(loss, params, sigma=0.1, num_pairs=4, seed=0)
        assert all(torch.equal(p, b) for p, b in zip(params, before)), fail_at
    smoothed_loss_grad(lambda: F.cross_entropy(model(x), y), params, sigma=0.1, num_pairs=4,
                       seed=0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_same_seed_same_estimate_bit_for_bit_and_shapes_kept():
    model = MLP(6, [5], 3).double()
    params = list(model.parameters())
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))

    def run(seed):
        return smoothed_loss_grad(lambda: F.cross_entropy(model(x), y), params, sigma=0.01,
                                  num_pairs=3, seed=seed)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert [g.shape for g in a] == [p.shape for p in params]
    assert all(g.dtype == torch.float64 for g in a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_and_leaves_parameters(bad):
    theta = torch.tensor([0.1, 0.2])
    before = theta.clone()
    calls = {"n": 0}

    def loss():
        calls["n"] += 1
        return torch.tensor(bad) if calls["n"] == 3 else theta.sum()

    with pytest.raises(NonFiniteLossError, match="pair 1"):
        smoothed_loss_grad(loss, [theta], sigma=0.1, num_pairs=4, seed=0)
    assert torch.equal(theta, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(num_pairs=0), "num_pairs"),
        (dict(num_pairs=2.5), "num_pairs"),
        (dict(estimator="mirror"), "unknown estimator"),
    ],
)
def test_bad_arguments(kwargs, message):
    options = dict(sigma=0.1, num_pairs=2, seed=0)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        smoothed_loss_grad(lambda: torch.tensor(0.0), [torch.zeros(2)], **options)
    with pytest.raises(ValueError, match="empty"):
        smoothed_loss_grad(lambda: torch.tensor(0.0), [], sigma=0.1, num_pairs=2, seed=0)


def test_estimate_points_along_the_autograd_gradient_of_a_network():
    # for small σ the loss is locally linear and E[cos(ĝ, ∇L)] ≈ sqrt(N / (N + d + 1));
    # with d = 163 parameters and N = 512 pairs that is 0.87; 0.7 leaves room for curvature
    torch.manual_seed(0)
    model = MLP(8, [16], 3)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    true = torch.autograd.grad(loss, params)
    est = smoothed_loss_grad(lambda: F.cross_entropy(model(x), y), params, sigma=1e-3,
                             num_pairs=512, seed=0)
    flat_t = torch.cat([g.flatten() for g in true])
    flat_e = torch.cat([g.flatten() for g in est])
    assert F.cosine_similarity(flat_t, flat_e, dim=0) > 0.7


def test_fitness_shaping_uses_centered_ranks():
    ranks = centered_ranks(torch.tensor([3.0, -1.0, 10.0, 0.0]))
    assert torch.allclose(ranks, torch.tensor([1 / 6, -0.5, 0.5, -1 / 6]))
    plus, minus = torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0])
    # joint centered ranks of (1, 5, 2, 0): plus (−1/6, 1/2), minus (1/6, −1/2); 2σN = 2
    c = pair_coefficients(plus, minus, sigma=0.5, estimator="antithetic", fitness_shaping=True)
    assert torch.allclose(c.float(), torch.tensor([(-1 / 6 - 1 / 6), (0.5 + 0.5)]) / 2)
    theta = torch.tensor([0.3, -0.2])
    est = estimate_smoothed_grad(lambda: 1000 * torch.cos(theta).sum(), [theta], sigma=0.1,
                                 num_pairs=8, seed=0, fitness_shaping=True)
    # ranks are bounded: the estimate does not scale with the loss
    assert est.grads[0].abs().max() < 8 / 0.1


def test_forward_counts_and_diagnostics():
    theta = torch.zeros(3)
    anti = estimate_smoothed_grad(lambda: theta.sum(), [theta], sigma=0.1, num_pairs=5, seed=0)
    one = estimate_smoothed_grad(lambda: theta.sum(), [theta], sigma=0.1, num_pairs=5, seed=0,
                                 estimator="one_sided")
    assert (anti.num_forward, one.num_forward) == (10, 6)
    assert anti.mean_abs_diff == pytest.approx(
        (anti.losses_plus - anti.losses_minus).abs().mean().item())
    assert one.baseline == 0.0


def test_noise_injection_gradient_is_unbiased_for_the_smoothed_gradient():
    # ∇L_σ(θ) = E[∇L(θ + σg)] (reparameterisation), the objective of NoiseInjectionClassifier
    m = 4000
    g = torch.randn(m, THETA.numel(), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    points = (THETA + SIGMA * g).requires_grad_(True)
    (grads,) = torch.autograd.grad(torch.cos(points).sum(), points)
    assert within(grads, COS_TRUTH)
    assert not within(grads, -torch.sin(THETA))

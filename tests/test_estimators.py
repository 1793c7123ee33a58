"""The smoothed-loss gradient estimators against closed forms, with tolerances from their variance.

How the statistical checks are built: average M independent estimates (seeds 0..M-1) and check,
per coordinate, |mean − truth| ≤ K·s/√M, with s the empirical standard deviation of the M
estimates. With d ≤ 5 coordinates and a family-wise false-alarm rate of 1e-4, Bonferroni asks for
the two-sided normal quantile Φ⁻¹(1 − 1e-4/(2d)) = 4.42 (d = 5); K = 4.5. M ≥ 1000, so the
Student-t quantile of s (≥ 999 degrees of freedom) is within 2% of the normal one and the mean is
normal to a good approximation. The seeds are fixed, so each test is deterministic; the rate says
how unlikely a failure of a correct estimator is over the choice of seeds.

Each such check is paired with a wrong target that the same check must reject (the tests can fail),
chosen many standard errors away from the truth; the comments give the numbers.
"""

import doctest
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robusttrain.zo.estimators as estimators
from robusttrain.models import MLP
from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.zo.estimators import (
    ESTIMATORS,
    NonFiniteLossError,
    centered_ranks,
    estimate_smoothed_grad,
    pair_coefficients,
    smoothed_loss_grad,
)
from robusttrain.zo.perturbations import Perturbation

K = 4.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread (conftest.single_thread)."""


def many_estimates(make_loss, theta0, m, **options):
    """M estimates with seeds 0..M-1, stacked to shape (M, d)."""
    out = []
    for seed in range(m):
        theta = theta0.clone()
        (g,) = smoothed_loss_grad(make_loss(theta), [theta], seed=seed, **options)
        out.append(g)
    return torch.stack(out)


def within(estimates, truth):
    """|mean − truth| ≤ K·s/√M in every coordinate (see the module docstring)."""
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(len(estimates))
    return bool(((mean - truth).abs() <= K * se).all())


# --- L(θ) = Σ cos θ_i: E[cos(θ + σg)] = cos θ · exp(−σ²/2), so ∇L_σ = −exp(−σ²/2) sin θ ---------

THETA = torch.tensor([1.0, -1.2, 2.0, 0.9, -2.2], dtype=torch.float64)  # |sin θ| ≥ 0.78
SIGMA = 1.0  # exp(−σ²/2) = 0.61: the smoothing visibly shrinks the gradient
COS_TRUTH = -math.exp(-(SIGMA**2) / 2) * torch.sin(THETA)
M_COS = 1000


def cos_loss(theta):
    return lambda: torch.cos(theta).sum()


@functools.cache
def cos_estimates(estimator):
    return many_estimates(cos_loss, THETA, M_COS, sigma=SIGMA, num_pairs=4, estimator=estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unbiased_for_the_smoothed_cosine(estimator):
    assert within(cos_estimates(estimator), COS_TRUTH)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_check_rejects_the_unsmoothed_gradient(estimator):
    # −sin θ (no exp factor) differs from the truth by 0.39·|sin θ| ≥ 0.31 per coordinate; the
    # estimates' s is ≤ 0.75 (measured), so s/√M ≤ 0.024 and the gap is ≥ 13 standard errors
    assert not within(cos_estimates(estimator), -torch.sin(THETA))


# --- L(θ) = ½θᵀAθ + bᵀθ: L_σ = L + σ²/2·tr A, so ∇L_σ = ∇L = Aθ + b ------------------------------

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]], dtype=torch.float64)
B = torch.tensor([0.1, -0.4, 0.2], dtype=torch.float64)
THETA_Q = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
SIGMA_Q = 0.3
PAIRS_Q = 4
M_QUAD = 1000


def quad_loss(theta):
    return lambda: 0.5 * theta @ A @ theta + B @ theta


@functools.cache
def quad_estimates(estimator):
    return many_estimates(quad_loss, THETA_Q, M_QUAD, sigma=SIGMA_Q, num_pairs=PAIRS_Q,
                          estimator=estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unbiased_for_a_quadratic_where_smoothing_keeps_the_gradient(estimator):
    truth = A @ THETA_Q + B
    est = quad_estimates(estimator)
    assert within(est, truth)
    # the noisiest estimator (plain) has s ≈ 3.1 per coordinate (its closed-form total variance
    # below, 113.6/N = 28.4, over 3 coordinates; measured ≤ 3.2), s/√M ≤ 0.10: an offset of 1.0
    # is ≥ 10 standard errors
    assert not within(est, truth + 1.0)


def quadratic_variance(estimator, d=3):
    """Closed-form tr Cov of one pair's term v for the quadratic (docs/theory.md, section 3).

    With b = ∇L(θ), L0 = L(θ) and Gaussian moments E[(zᵀb)²‖z‖²] = (d+2)‖b‖²,
    E[(zᵀAz)²‖z‖²] = (d+4)((tr A)² + 2 tr A²), E[zᵀAz ‖z‖²] = (d+2) tr A (odd moments vanish):
      antithetic: v = (zᵀb) z                        → (d+1)‖b‖²
      one_sided:  v = (zᵀb + σ/2·zᵀAz) z             → + σ²/4·(d+4)((tr A)² + 2 tr A²)
      plain:      v = (L0/σ + zᵀb + σ/2·zᵀAz) z      → + d·L0²/σ² + (d+2)·L0·tr A
    """
    b = A @ THETA_Q + B
    loss0 = quad_loss(THETA_Q)()
    trace, trace_sq = torch.trace(A), torch.trace(A @ A)
    variance = (d + 1) * (b @ b)
    if estimator in ("one_sided", "plain"):
        variance = variance + SIGMA_Q**2 / 4 * (d + 4) * (trace**2 + 2 * trace_sq)
    if estimator == "plain":
        variance = variance + d * loss0**2 / SIGMA_Q**2 + (d + 2) * loss0 * trace
    return float(variance)


def total_variance_with_se(est):
    """Σ_j s_j² of the estimates, and its standard error std(q)/√M with q_m = ‖x_m − x̄‖²."""
    q = ((est - est.mean(0)) ** 2).sum(1)
    m = len(est)
    return float(q.sum() / (m - 1)), float(q.std() / math.sqrt(m))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_variance_matches_its_closed_form(estimator):
    # an estimate averages N pairs, so its total variance is tr Cov(v)/N; the empirical value is
    # a mean of M terms q_m, normal by the CLT with the standard error above, K = 4.5 as before
    # (three estimators: Bonferroni quantile 4.15 at 1e-4)
    total, se = total_variance_with_se(quad_estimates(estimator))
    assert abs(total - quadratic_variance(estimator) / PAIRS_Q) <= K * se
    # and the neighbouring estimator's value is rejected: the closed forms (per pair 15.4, 25.7,
    # 113.6) differ by ≥ 40% while se is ≤ 6% of the value for M = 1000 (≥ 7 se apart)
    other = {"antithetic": "one_sided", "one_sided": "antithetic", "plain": "one_sided"}[estimator]
    assert abs(total - quadratic_variance(other) / PAIRS_Q) > K * se


def test_antithetic_has_the_lowest_variance():
    # the closed forms order the estimators (the test above ties each to the sampled variance);
    # the even part ½σ²zᵀAz cancels in an antithetic pair but not against a baseline, and plain
    # also carries L(θ)/σ·z
    per_pair = {name: quadratic_variance(name) for name in ESTIMATORS}
    assert per_pair["antithetic"] < per_pair["one_sided"] < per_pair["plain"]
    # per estimate the gaps are 2.6 and 22, against K·(se₁ + se₂) = 2.4 and 6.5; the samples share
    # their seeds, so their difference is more precise still (positively correlated)
    sampled = {name: total_variance_with_se(quad_estimates(name))[0] for name in ESTIMATORS}
    assert sampled["antithetic"] < sampled["one_sided"] < sampled["plain"]


def test_smoothed_quadratic_adds_half_sigma_squared_trace():
    # L_σ(θ) = L(θ) + σ²/2·tr(∇²L): the flat-minimum penalty of docs/theory.md, by plain Monte Carlo
    g = torch.Generator().manual_seed(0)
    m = 200_000
    z = torch.randn(m, 3, generator=g, dtype=torch.float64)
    pts = THETA_Q + SIGMA_Q * z
    values = 0.5 * ((pts @ A) * pts).sum(1) + pts @ B
    truth = quad_loss(THETA_Q)() + SIGMA_Q**2 / 2 * torch.trace(A)
    se = values.std() / math.sqrt(m)
    assert abs(values.mean() - truth) <= K * se
    # without the penalty (σ²/2·tr A = 0.27, se ≈ 0.003) the check fails
    assert abs(values.mean() - quad_loss(THETA_Q)()) > K * se


def test_second_moment_grows_with_dimension_and_shrinks_with_pairs():
    # for a linear L(θ) = bᵀθ the antithetic estimate is (1/N)Σ(z_iᵀb)z_i and
    # E‖ĝ‖² = ‖b‖²·(1 + (d + 1)/N) exactly (docs/theory.md, formula 4); ‖ĝ‖²/‖b‖² is averaged
    # over M estimates and checked with its own standard error (three cases: K = 4.5)
    m = 500
    for d, n in [(50, 4), (50, 16), (10, 4)]:
        b = torch.linspace(-1, 1, d, dtype=torch.float64)
        est = many_estimates(lambda t, b=b: (lambda: b @ t), torch.zeros(d, dtype=torch.float64),
                             m, sigma=0.1, num_pairs=n)
        ratio = (est**2).sum(1) / (b @ b)
        se = ratio.std().item() / math.sqrt(m)
        predicted = 1 + (d + 1) / n
        assert abs(ratio.mean().item() - predicted) <= K * se, (d, n)
        # the noise-free value 1 (no d/N term) is rejected: (d+1)/N ≥ 2.75 is ≥ 10 se here
        assert abs(ratio.mean().item() - 1) > K * se, (d, n)


def test_noise_injection_gradient_is_unbiased_for_the_smoothed_gradient():
    # ∇L_σ(θ) = E[∇L(θ + σg)] (reparameterisation), the objective of NoiseInjectionClassifier
    m = 4000
    g = torch.randn(m, THETA.numel(), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    points = (THETA + SIGMA * g).requires_grad_(True)
    (grads,) = torch.autograd.grad(torch.cos(points).sum(), points)
    assert within(grads, COS_TRUTH)
    assert not within(grads, -torch.sin(THETA))


# --- the computation itself: directions, coefficients, restoration -----------------------------


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = MLP(6, [5], 3).to(dtype)
    x = torch.randn(8, 6, dtype=dtype)
    y = torch.randint(0, 3, (8,))
    return model, list(model.parameters()), lambda: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("fitness_shaping", [False, True])
def test_estimate_is_sum_of_coefficients_times_the_seeded_directions(estimator, fitness_shaping):
    # the convention the batched path relies on: the loss sees exactly clean ± σz_i with z_i from
    # draw_noise(pair_seed(seed, i)), and ĝ = Σ_i c_i z_i with c from pair_coefficients
    model, params, loss = small_model()
    clean = torch.cat([p.detach().flatten() for p in params])
    seen = []

    def recording_loss():
        seen.append(torch.cat([p.detach().flatten() for p in params]))
        return loss()

    sigma, n, seed = 0.05, 3, 7
    est = estimate_smoothed_grad(recording_loss, params, sigma=sigma, num_pairs=n, seed=seed,
                                 estimator=estimator, fitness_shaping=fitness_shaping)
    directions = torch.stack([
        draw_noise(params, torch.Generator().manual_seed(pair_seed(seed, i))) for i in range(n)
    ])
    expected_points = [clean] if estimator == "one_sided" else []
    for z in directions:
        expected_points.append(torch.add(clean, z, alpha=sigma))
        if estimator == "antithetic":
            expected_points.append(torch.add(clean, z, alpha=-sigma))
    assert len(seen) == len(expected_points) == est.num_forward
    assert all(torch.equal(a, b) for a, b in zip(seen, expected_points))
    c = pair_coefficients(est.losses_plus, est.losses_minus, sigma=sigma, estimator=estimator,
                          baseline=est.baseline, fitness_shaping=fitness_shaping)
    flat = torch.cat([g.flatten() for g in est.grads])
    # float32 accumulation in a different order: rounding only (values are O(1))
    assert torch.allclose(flat, (c.float() @ directions), rtol=1e-5, atol=1e-6)


def test_each_direction_is_drawn_once(monkeypatch):
    calls = []
    draw = Perturbation.draw

    def counting_draw(*args, **kwargs):
        calls.append(1)
        return draw(*args, **kwargs)

    monkeypatch.setattr(Perturbation, "draw", counting_draw)
    _, params, loss = small_model()
    smoothed_loss_grad(loss, params, sigma=0.1, num_pairs=5, seed=0)
    assert len(calls) == 5  # one generator pass per pair serves +σ, −σ and the accumulation
    calls.clear()
    # ranks need every loss first: fitness shaping regenerates each direction once more
    smoothed_loss_grad(loss, params, sigma=0.1, num_pairs=5, seed=0, fitness_shaping=True)
    assert len(calls) == 10


@pytest.mark.parametrize(
    "estimator, calls", [("antithetic", 8), ("one_sided", 5), ("plain", 4)]
)
@pytest.mark.parametrize("fitness_shaping", [False, True])
def test_restores_parameters_bit_for_bit_also_when_the_loss_raises(estimator, calls,
                                                                   fitness_shaping):
    _, params, loss = small_model()
    before = [p.detach().clone() for p in params]
    options = dict(sigma=0.1, num_pairs=4, seed=0, estimator=estimator,
                   fitness_shaping=fitness_shaping)
    for fail_at in [1, calls // 2, calls]:  # first, middle and last call
        count = {"n": 0}

        def failing_loss(count=count, fail_at=fail_at):
            count["n"] += 1
            if count["n"] == fail_at:
                raise RuntimeError("boom")
            return loss()

        with pytest.raises(RuntimeError, match="boom"):
            smoothed_loss_grad(failing_loss, params, **options)
        assert count["n"] == fail_at
        assert all(torch.equal(p, b) for p, b in zip(params, before)), fail_at
    est = estimate_smoothed_grad(loss, params, **options)
    assert est.num_forward == calls
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_same_seed_same_estimate_bit_for_bit_and_the_global_rng_untouched():
    _, params, loss = small_model(torch.float64)
    state = torch.get_rng_state()

    def run(seed):
        return smoothed_loss_grad(loss, params, sigma=0.01, num_pairs=3, seed=seed)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))
    assert torch.equal(torch.get_rng_state(), state)


def test_shapes_and_dtypes_are_kept():
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(3, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float16)

    def loss():
        return (weight.sum() + bias.sum() + scale.float()) ** 2

    grads = smoothed_loss_grad(loss, [weight, bias, scale], sigma=0.1, num_pairs=2, seed=0)
    assert [g.shape for g in grads] == [weight.shape, bias.shape, scale.shape]
    assert [g.dtype for g in grads] == [torch.float32, torch.float64, torch.float16]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("call, pair, sign", [(3, 1, "+"), (4, 1, "-")])
def test_non_finite_loss_raises_and_leaves_parameters(bad, call, pair, sign):
    theta = torch.tensor([0.1, 0.2])
    before = theta.clone()
    count = {"n": 0}

    def loss():
        count["n"] += 1
        return torch.tensor(bad) if count["n"] == call else theta.sum()

    with pytest.raises(NonFiniteLossError, match=rf"{bad} at pair {pair}, \{sign}sigma") as info:
        smoothed_loss_grad(loss, [theta], sigma=0.1, num_pairs=4, seed=0)
    assert "learning rate or sigma" in str(info.value)
    assert (info.value.pair, info.value.sign) == (pair, sign)
    assert isinstance(info.value, FloatingPointError)
    assert torch.equal(theta, before)


def test_non_finite_baseline_names_the_clean_parameters():
    theta = torch.tensor([0.1, 0.2])
    with pytest.raises(NonFiniteLossError, match="clean parameters") as info:
        smoothed_loss_grad(lambda: float("nan"), [theta], sigma=0.1, num_pairs=2, seed=0,
                           estimator="one_sided")
    assert info.value.pair is None
    with pytest.raises(NonFiniteLossError, match="pair 1, -sigma"):
        pair_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([0.0, float("inf")]), sigma=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=0.0), "sigma must be a positive finite number"),
        (dict(sigma=-0.1), "sigma must be a positive finite number"),
        (dict(sigma=float("nan")), "sigma must be a positive finite number"),
        (dict(sigma=float("inf")), "sigma must be a positive finite number"),
        (dict(sigma="0.1"), "sigma must be a positive finite number"),
        (dict(num_pairs=0), "num_pairs must be an integer >= 1"),
        (dict(num_pairs=2.5), "num_pairs must be an integer >= 1"),
        (dict(num_pairs=True), "num_pairs must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(estimator="mirror"), "unknown estimator 'mirror'; choose one of antithetic"),
    ],
)
def test_bad_arguments(kwargs, message):
    theta = torch.zeros(2)
    options = dict(sigma=0.1, num_pairs=2, seed=0)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        smoothed_loss_grad(lambda: theta.sum(), [theta], **options)


@pytest.mark.parametrize(
    "params, message",
    [
        ([], "params is empty"),
        ([torch.zeros(2), torch.zeros(2, device="meta")], "several devices"),
        ([torch.zeros(2, dtype=torch.int64)], r"params\[0\] is a torch.int64 tensor"),
        ([torch.zeros(2), [0.0, 1.0]], r"params\[1\] is list"),
    ],
)
def test_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        smoothed_loss_grad(lambda: 0.0, params, sigma=0.1, num_pairs=2, seed=0)


def test_the_same_tensor_twice_is_refused():
    theta = torch.zeros(2)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] are the same tensor"):
        smoothed_loss_grad(lambda: theta.sum(), [theta, theta], sigma=0.1, num_pairs=2, seed=0)


@pytest.mark.parametrize(
    "returned, message",
    [(torch.zeros(3), r"scalar loss, got a tensor of shape \(3,\)"), (None, "got NoneType")],
)
def test_loss_fn_must_return_a_scalar(returned, message):
    theta = torch.tensor([0.5, -0.5])
    before = theta.clone()
    with pytest.raises(ValueError, match=message):
        smoothed_loss_grad(lambda: returned, [theta], sigma=0.1, num_pairs=2, seed=0)
    assert torch.equal(theta, before)


def test_numpy_scalars_are_accepted():
    theta = torch.tensor([0.5, -0.5])
    a = smoothed_loss_grad(lambda: theta.sum(), [theta], sigma=np.float32(0.25),
                           num_pairs=np.int64(3), seed=np.int64(4))
    b = smoothed_loss_grad(lambda: theta.sum(), [theta], sigma=0.25, num_pairs=3, seed=4)
    assert torch.equal(a[0], b[0])


def test_pair_coefficients_formulas():
    plus, minus = torch.tensor([1.0, 4.0]), torch.tensor([2.0, 0.0])
    sigma, n = 0.5, 2
    anti = pair_coefficients(plus, minus, sigma=sigma, estimator="antithetic")
    one = pair_coefficients(plus, sigma=sigma, estimator="one_sided", baseline=1.5)
    plain = pair_coefficients(plus, sigma=sigma, estimator="plain")
    assert torch.equal(anti, torch.tensor([-1.0, 4.0], dtype=torch.float64) / (2 * sigma * n))
    assert torch.equal(one, torch.tensor([-0.5, 2.5], dtype=torch.float64) / (sigma * n))
    assert torch.equal(plain, torch.tensor([1.0, 4.0], dtype=torch.float64) / (sigma * n))
    # a baseline is ignored where it is not used (the batched path always passes one)
    assert torch.equal(pair_coefficients(plus, minus, sigma=sigma, baseline=9.0), anti)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((torch.ones(2),), dict(estimator="antithetic"), "needs losses_minus"),
        ((torch.ones(2), torch.ones(3)), {}, "losses_minus has shape"),
        ((torch.ones(2), torch.ones(2)), dict(estimator="plain"), "only used by the antithetic"),
        ((torch.ones(2),), dict(estimator="one_sided"), "needs the baseline"),
        ((torch.ones(2, 2), torch.ones(2, 2)), {}, "non-empty 1-D tensor"),
        ((torch.ones(0), torch.ones(0)), {}, "non-empty 1-D tensor"),
        ((torch.ones(2), torch.ones(2)), dict(sigma=0.0), "sigma must be"),
        ((torch.ones(2),), dict(estimator="mirror"), "unknown estimator"),
    ],
)
def test_pair_coefficients_bad_input(args, kwargs, message):
    kwargs = {"sigma": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        pair_coefficients(*args, **kwargs)


def test_estimate_points_along_the_autograd_gradient_of_a_network():
    # For small σ the loss is locally linear, L(θ ± σz) = L(θ) ± σ zᵀ∇L + O(σ³) (the even part
    # cancels), so ĝ = (1/N) Σ (z_iᵀ∇L) z_i. Split z_i = a_i·u + r_i along u = ∇L/‖∇L‖
    # (a_i ~ N(0, 1), r_i in the other d − 1 dimensions): ĝ/‖∇L‖ = U·u + R, where
    #   U = Σa_i²/N has mean 1 and sd √(2/N), and R | a ~ N(0, U/N·I_{d−1}),
    #   cos(ĝ, ∇L) = 1/√(1 + q),  q = ‖R‖²/U² ≈ (d−1)/N · X/U,  X = χ²_{d−1}/(d−1).
    # For d = 195, N = 512: q ≈ 0.38 with relative sd √(2/N + 2/(d−1)) = 0.12, so
    # cos ≈ 0.850 ≈ √(N/(N+d+1)) (docs/theory.md, 4a) with sd ½(1+q)^{−3/2}·0.12·0.38 = 0.014
    # (20 seeds measured: mean 0.847, sd 0.015). K = 4.5 sd is 0.063; a wrong direction (a random
    # one has cos ~ N(0, 1/d)) is ≥ 0.78 away.
    torch.manual_seed(0)
    model = MLP(8, [16], 3)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    params = list(model.parameters())
    d, n = sum(p.numel() for p in params), 512
    assert d == 195
    true = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    est = smoothed_loss_grad(lambda: F.cross_entropy(model(x), y), params, sigma=1e-3,
                             num_pairs=n, seed=0)
    assert [g.shape for g in est] == [p.shape for p in params]
    assert all(g.dtype == torch.float32 for g in est)
    flat_t = torch.cat([g.flatten() for g in true])
    flat_e = torch.cat([g.flatten() for g in est])
    cosine = float(F.cosine_similarity(flat_t, flat_e, dim=0))
    assert abs(cosine - math.sqrt(n / (n + d + 1))) <= K * 0.014
    # and the scale is right: ĝᵀ∇L/‖∇L‖² = U has mean 1 and sd √(2/N) = 0.0625
    projection = float(flat_e @ flat_t / (flat_t @ flat_t))
    assert abs(projection - 1) <= K * math.sqrt(2 / n)


def test_fitness_shaping_uses_centered_ranks():
    ranks = centered_ranks(torch.tensor([3.0, -1.0, 10.0, 0.0]))
    assert torch.allclose(ranks, torch.tensor([1 / 6, -0.5, 0.5, -1 / 6]))
    assert torch.equal(centered_ranks(torch.tensor([7.0])), torch.tensor([0.0]))
    plus, minus = torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0])
    # joint centered ranks of (1, 5, 2, 0): plus (−1/6, 1/2), minus (1/6, −1/2); 2σN = 2
    c = pair_coefficients(plus, minus, sigma=0.5, estimator="antithetic", fitness_shaping=True)
    assert torch.allclose(c.float(), torch.tensor([(-1 / 6 - 1 / 6), (0.5 + 0.5)]) / 2)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fitness_shaping_depends_only_on_the_order_of_the_losses(estimator):
    # ranks are invariant under increasing transforms: L and exp(10·L) + 3 give the same
    # estimate, while the unshaped estimate changes with them
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    sigma, n = 0.01, 6
    options = dict(sigma=sigma, num_pairs=n, seed=3, estimator=estimator)

    def loss():
        return torch.cos(theta).sum()

    def transformed():
        return torch.exp(10 * loss()) + 3

    shaped = estimate_smoothed_grad(loss, [theta], fitness_shaping=True, **options)
    again = estimate_smoothed_grad(transformed, [theta], fitness_shaping=True, **options)
    assert torch.equal(shaped.grads[0], again.grads[0])
    assert not torch.allclose(smoothed_loss_grad(loss, [theta], **options)[0],
                              smoothed_loss_grad(transformed, [theta], **options)[0])
    # bounded whatever the loss scale: centered ranks differ by at most 1, so |c_i| ≤ 1/(σN)
    c = pair_coefficients(again.losses_plus, again.losses_minus, sigma=sigma, estimator=estimator,
                          baseline=again.baseline, fitness_shaping=True)
    assert c.abs().max() <= 1 / (sigma * n)


def test_forward_counts_and_diagnostics():
    theta = torch.zeros(3)
    options = dict(sigma=0.1, num_pairs=5, seed=0)
    anti = estimate_smoothed_grad(lambda: theta.sum(), [theta], **options)
    one = estimate_smoothed_grad(lambda: theta.sum(), [theta], estimator="one_sided", **options)
    plain = estimate_smoothed_grad(lambda: theta.sum(), [theta], estimator="plain", **options)
    assert (anti.num_forward, one.num_forward, plain.num_forward) == (10, 6, 5)
    assert anti.mean_abs_diff == pytest.approx(
        (anti.losses_plus - anti.losses_minus).abs().mean().item())
    assert one.mean_abs_diff == pytest.approx((one.losses_plus - 0.0).abs().mean().item())
    assert one.baseline == 0.0 and anti.baseline is None and plain.losses_minus is None
    assert math.isnan(plain.mean_abs_diff)
    assert anti.losses_plus.shape == (5,) and anti.losses_minus.shape == (5,)


def test_the_docstring_example_runs():
    result = doctest.testmod(estimators, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_zscore_shaping_is_the_raw_estimate_over_the_spread_of_the_losses():
    g = torch.Generator().manual_seed(0)
    plus, minus = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g,
                                                                              dtype=torch.float64)
    both = torch.cat([plus, minus])
    std = (both - both.mean()).pow(2).mean().sqrt()
    raw = pair_coefficients(plus, minus, sigma=0.5, estimator="antithetic")
    shaped = pair_coefficients(plus, minus, sigma=0.5, estimator="antithetic",
                               fitness_shaping="zscore")
    torch.testing.assert_close(shaped, raw / std)
    # invariant to an affine change of the loss scale
    rescaled = pair_coefficients(1000 * plus + 5, 1000 * minus + 5, sigma=0.5,
                                 estimator="antithetic", fitness_shaping="zscore")
    torch.testing.assert_close(rescaled, shaped)
    # equal losses carry no information: zero coefficients, not NaN
    flat = pair_coefficients(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                             sigma=0.5, fitness_shaping="zscore")
    assert torch.equal(flat, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fitness_shaping must be one of"):
        pair_coefficients(plus, minus, sigma=0.5, fitness_shaping="softmax")

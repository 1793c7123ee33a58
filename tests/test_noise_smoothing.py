"""Smoothing in the units of a weight-noise model: the scales, the estimators, the training methods.

Training at level η under a noise model minimizes E_g[L(θ + σ(θ)⊙g)] with σ = η·s(w) on the
tensors the noise model touches and an absolute σ elsewhere (docs/theory.md, §11); the antithetic
estimate is Σ_i (L(θ+σ⊙z_i) − L(θ−σ⊙z_i)) z_i / (2Nσ) elementwise. The statistical checks follow
tests/test_estimators.py: M independent estimates, |mean − truth| ≤ K·s/√M per coordinate with
K = 4.5 (Bonferroni for d ≤ 8 coordinates at a family-wise rate of 1e-4 asks for 4.37), each
paired with a wrong target the same check must reject.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.models import MLP
from robusttrain.noise import noisy_parameters, smoothing_sigmas
from robusttrain.noise.seeds import pair_seed
from robusttrain.noise.weight import MULTIPLICATIVE_FLOOR, draw_directions
from robusttrain.training import NoiseInjectionClassifier, ZerothOrderClassifier
from robusttrain.zo.estimators import estimate_smoothed_grad, smoothed_loss_grad
from robusttrain.zo.perturbations import Perturbation
from robusttrain.zo.population import perturbed_losses, population_smoothed_grad

K = 4.5
M = 1000
SIGMA_OTHER = 0.7  # the absolute σ of the bias (outside the noise models)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread (conftest.single_thread)."""


def within(estimates, truth):
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(len(estimates))
    return bool(((mean - truth).abs() <= K * se).all())


def layer():
    """A Linear(3, 2) with weights of very different sizes: the noise models then differ."""
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -0.4, 1.1], [-1.5, 0.05, 0.8]]))
        lin.bias.copy_(torch.tensor([0.9, -2.0]))
    return lin


LEVELS = {"absolute": 0.8, "relative": 0.4, "multiplicative": 0.6}


def flat_sigma(lin, noise):
    sigmas = smoothing_sigmas(lin, [lin.weight, lin.bias], noise=noise, level=LEVELS[noise],
                              sigma=SIGMA_OTHER)
    return torch.cat([torch.as_tensor(s, dtype=torch.float64).expand(p.shape).reshape(-1)
                      for s, p in zip(sigmas, [lin.weight, lin.bias])]), sigmas


def cos_estimates(noise, **options):
    """M estimates for L = Σ cos over every parameter of the layer, flattened to (M, 8)."""
    lin = layer()
    params = [lin.weight, lin.bias]
    _, sigmas = flat_sigma(lin, noise)

    def loss():
        return torch.cos(lin.weight).sum() + torch.cos(lin.bias).sum()

    out = []
    for seed in range(M):
        grads = smoothed_loss_grad(loss, params, sigma=sigmas, num_pairs=4, seed=seed, **options)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(out)


def theta():
    lin = layer()
    return torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach().reshape(-1)])


@pytest.mark.parametrize("noise", list(LEVELS))
def test_smoothing_sigmas_follow_the_noise_model(noise):
    lin = layer()
    w = lin.weight.detach()
    sigma_w, sigma_b = smoothing_sigmas(lin, [lin.weight, lin.bias], noise=noise,
                                        level=LEVELS[noise], sigma=SIGMA_OTHER)
    level = LEVELS[noise]
    expected = {
        "absolute": torch.full((), level, dtype=torch.float64),
        "relative": level * w.abs().max(),
        "multiplicative": level * w.abs().clamp(min=MULTIPLICATIVE_FLOOR * w.abs().mean()),
    }[noise]
    assert torch.allclose(torch.as_tensor(sigma_w, dtype=torch.float64), expected)
    assert sigma_b == SIGMA_OTHER  # the bias is outside every noise model (as in the evaluation)
    if noise == "multiplicative":
        # the 0.05 weight is below a tenth of the mean |w| (0.98): it is smoothed at the floor
        assert float(sigma_w[1, 1]) == pytest.approx(level * 0.1 * float(w.abs().mean()))


def test_smoothing_sigmas_cover_exactly_the_tensors_the_evaluation_perturbs():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(8, 3))
    params = list(model.parameters())
    sigmas = smoothing_sigmas(model, params, noise="relative", level=0.1, sigma=0.003)
    covered = {id(p) for _, p in noisy_parameters(model)}
    for p, s in zip(params, sigmas):
        assert (id(p) in covered) == isinstance(s, torch.Tensor)


def test_an_all_zero_tensor_falls_back_to_the_absolute_sigma():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
    for noise in ("relative", "multiplicative"):
        (s,) = smoothing_sigmas(lin, [lin.weight], noise=noise, level=0.1, sigma=0.02)
        assert s == 0.02


@pytest.mark.parametrize(
    "kwargs, message",
    [({"noise": "gaussian", "level": 0.1}, "unknown noise model"),
     ({"noise": "relative", "level": 0.0}, "must be > 0"),
     ({"noise": "relative", "level": 0.1, "sigma": 0.0}, "positive number")],
)
def test_smoothing_sigmas_bad_input(kwargs, message):
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=message):
        smoothing_sigmas(lin, [lin.weight], **{"sigma": 0.01, **kwargs})


@pytest.mark.parametrize("noise", list(LEVELS))
def test_unbiased_for_the_cosine_smoothed_in_the_noise_models_units(noise):
    # E[cos(θ_k + σ_k g)] = cos θ_k exp(−σ_k²/2): ∇ = −exp(−σ_k²/2) sin θ_k with σ_k held fixed
    sigma, _ = flat_sigma(layer(), noise)
    truth = -torch.exp(-(sigma**2) / 2) * torch.sin(theta())
    est = cos_estimates(noise)
    assert within(est, truth)
    # wrong targets the check must reject (measured distance from the mean, in standard errors):
    # the unsmoothed gradient −sin θ (≥ 12 for every model), and for the scaled models the same
    # level taken as an absolute σ on every tensor, the units of the old σ (relative ≥ 9,
    # multiplicative ≥ 19)
    assert not within(est, -torch.sin(theta()))
    if noise != "absolute":
        wrong_sigma = torch.full_like(sigma, LEVELS[noise])
        assert not within(est, -torch.exp(-(wrong_sigma**2) / 2) * torch.sin(theta()))


def test_relative_low_rank_directions_are_unbiased_for_a_quadratic():
    # L = ½ Σ a_k θ_k² + cᵀθ: the antithetic difference is exactly 2 σ ∇L·E for any direction E,
    # so with E[E Eᵀ] = I (low-rank A Bᵀ/√r included) the estimate is unbiased for ∇L
    lin = layer()
    params = [lin.weight, lin.bias]
    sigmas = smoothing_sigmas(lin, params, noise="relative", level=0.3, sigma=SIGMA_OTHER)
    a = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    c = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)

    def loss():
        t = torch.cat([lin.weight.reshape(-1), lin.bias.reshape(-1)])
        return 0.5 * (a * t * t).sum() + c @ t

    est = torch.stack([
        torch.cat([g.reshape(-1) for g in smoothed_loss_grad(
            loss, params, sigma=sigmas, num_pairs=4, seed=seed, perturbation="lowrank")])
        for seed in range(M)])
    truth = a * theta() + c
    assert within(est, truth)
    # forgetting the division by max|W| = 2 would give twice the weights' gradient: ≥ 20 s.e.
    wrong = truth.clone()
    wrong[:6] *= 2.0
    assert not within(est, wrong)


def test_the_pairs_move_each_tensor_by_its_own_sigma():
    lin = layer()
    params = [lin.weight, lin.bias]
    clean = [p.detach().clone() for p in params]
    sigmas = smoothing_sigmas(lin, params, noise="multiplicative", level=0.2, sigma=0.05)
    seen = []

    def loss():
        seen.append([p.detach().clone() for p in params])
        return torch.cos(lin.weight).sum()

    smoothed_loss_grad(loss, params, sigma=sigmas, num_pairs=2, seed=3)
    for i in range(2):
        z = Perturbation().draw(params, torch.Generator().manual_seed(pair_seed(3, i)))
        zs = [z[:6].view(2, 3).double(), z[6:].double()]
        for sign, point in zip((1, -1), seen[2 * i : 2 * i + 2]):
            for p0, p, s, zz in zip(clean, point, sigmas, zs):
                assert torch.allclose(p, p0 + sign * torch.as_tensor(s, dtype=p.dtype) * zz)
    assert all(torch.equal(p, c) for p, c in zip(params, clean))


@pytest.mark.parametrize(
    "noise, perturbation",
    [("relative", "gaussian"), ("relative", "lowrank"), ("multiplicative", "gaussian"),
     ("absolute", "lowrank")],
)
@pytest.mark.parametrize("batch_mode", ["shared", "split"])
def test_the_engine_and_the_loop_agree_with_per_tensor_sigmas(noise, perturbation, batch_mode):
    torch.manual_seed(0)
    model = MLP(12, [10], 4)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    params = list(model.parameters())
    sigmas = smoothing_sigmas(model, params, noise=noise, level=0.05, sigma=0.01)
    options = dict(sigma=sigmas, num_pairs=4, seed=5, perturbation=perturbation, rank=2)
    batched = population_smoothed_grad(model, x, y, batch_mode=batch_mode, **options)
    if batch_mode == "split":
        rows = torch.arange(16).view(4, 4)
        loop = estimate_smoothed_grad(lambda i: F.cross_entropy(model(x[rows[i]]), y[rows[i]]),
                                      params, pair_loss=True, **options)
    else:
        loop = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, **options)
    assert torch.allclose(batched.losses_plus, loop.losses_plus, atol=1e-5)
    for g_b, g_l in zip(batched.grads, loop.grads):
        assert torch.allclose(g_b, g_l, rtol=1e-3, atol=1e-4)


def test_one_sigma_per_tensor_equal_to_a_number_gives_the_same_estimate():
    torch.manual_seed(0)
    model = MLP(6, [5], 3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    params = list(model.parameters())
    one = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, sigma=0.02,
                                 num_pairs=3, seed=1)
    many = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params,
                                  sigma=[0.02] * len(params), num_pairs=3, seed=1)
    for a, b in zip(one.grads, many.grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_multiplicative_noise_cannot_be_low_rank():
    model = MLP(6, [5], 3)
    params = list(model.parameters())
    sigmas = smoothing_sigmas(model, params, noise="multiplicative", level=0.05, sigma=0.01)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="cannot be low-rank"):
        smoothed_loss_grad(lambda: F.cross_entropy(model(x), y), params, sigma=sigmas,
                           num_pairs=2, seed=0, perturbation="lowrank")
    with pytest.raises(ValueError, match="cannot be low-rank"):
        population_smoothed_grad(model, x, y, sigma=sigmas, num_pairs=2, seed=0,
                                 perturbation="lowrank")
    with pytest.raises(ValueError, match="cannot be low-rank"):
        ZerothOrderClassifier(model, noise="multiplicative", level=0.05, perturbation="lowrank")


@pytest.mark.parametrize(
    "sigma, message",
    [([0.01], "give one scale per tensor"),
     ([0.01, torch.ones(3)], "shape"),
     ([0.01, torch.zeros(())], "positive and finite"),
     ([0.01, -1.0], r"sigma\[1\]")],
)
def test_bad_per_tensor_sigmas(sigma, message):
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        smoothed_loss_grad(lambda: lin.weight.sum(), [lin.weight, lin.bias], sigma=sigma,
                           num_pairs=1, seed=0)


def test_perturbed_losses_take_per_tensor_sigmas():
    torch.manual_seed(0)
    model = MLP(6, [5], 3)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    sigmas = smoothing_sigmas(model, params, noise="relative", level=0.1, sigma=0.01)
    z = Perturbation().draw_block(params, 0, 2)
    plus, minus = perturbed_losses(model, x, y, z, sigma=sigmas)
    for k in range(2):
        moved = [p + torch.as_tensor(s) * d for p, s, d in zip(
            params, sigmas, Perturbation().split(params, z[k : k + 1]))]
        with torch.no_grad():
            h = F.relu(F.linear(x.flatten(1), moved[0][0], moved[1][0]))
            expected = F.cross_entropy(F.linear(h, moved[2][0], moved[3][0]), y)
        assert float(plus[k]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"level": 0.1}, "needs a noise model"),
     ({"noise": "relative"}, "needs a level"),
     ({"noise": "relative", "level": 0.0}, "level must be > 0"),
     ({"noise": "uniform", "level": 0.1}, "unknown noise model")],
)
@pytest.mark.parametrize("cls", [ZerothOrderClassifier, NoiseInjectionClassifier])
def test_the_training_methods_check_noise_and_level(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(MLP(4, [3], 2), **kwargs)


def test_the_zo_method_smooths_in_relative_units():
    model = ZerothOrderClassifier(MLP(4, [3], 2), noise="relative", level=0.05, sigma=0.002)
    params = list(model.backbone.parameters())
    scales = model.smoothing_scale(params)
    weights = {id(p) for _, p in noisy_parameters(model.backbone)}
    for p, s in zip(params, scales):
        if id(p) in weights:
            assert float(s) == pytest.approx(0.05 * float(p.detach().abs().max()))
        else:
            assert s == 0.002
    meta = model.robusttrain_meta()
    assert (meta["noise"], meta["level"]) == ("relative", 0.05)
    assert ZerothOrderClassifier(MLP(4, [3], 2), sigma=0.03).smoothing_scale(params) == 0.03


def test_noise_injection_applies_the_evaluations_noise_and_restores_the_weights():
    torch.manual_seed(0)
    backbone = MLP(4, [3], 2)
    model = NoiseInjectionClassifier(
        backbone, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), noise="relative", level=0.1,
        seed=4)
    clean = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    seen = {}

    def record(module, inputs, output):
        seen[module] = (module.weight.detach().clone(), module.bias.detach().clone())

    linears = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(record) for m in linears]
    generator = torch.Generator().manual_seed(0)
    tensors = [p for _, p in noisy_parameters(backbone)]
    moved, changes = model._perturbation(list(backbone.parameters()), generator)
    assert [id(t) for t in moved] == [id(t) for t in tensors]  # the evaluation's tensors only
    expected = draw_directions(tensors, "relative", torch.Generator().manual_seed(0))
    for change, direction in zip(changes, expected):
        assert torch.allclose(change, 0.1 * direction)
    for h in handles:
        h.remove()
    assert all(torch.equal(p, clean[n]) for n, p in backbone.named_parameters())

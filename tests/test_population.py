"""The batched MLP path gives the in-place loop's estimate and never touches the parameters."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.models import MLP, LeNet, ResNet20
from robusttrain.zo.estimators import NonFiniteLossError, estimate_smoothed_grad
from robusttrain.zo.population import (
    choose_population,
    population_smoothed_grad,
    supports_population,
)


def problem(seed=0):
    torch.manual_seed(seed)
    model = MLP(20, [16, 12], 5, dropout=0.1)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    return model, x, y


@pytest.mark.parametrize("estimator", ["antithetic", "one_sided"])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_same_estimate_as_the_loop(estimator, chunk_size):
    model, x, y = problem()
    model.eval()  # dropout is frozen in perturbed forwards on both paths
    reference = estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y),
                                       list(model.parameters()), sigma=0.01, num_pairs=7,
                                       seed=5, estimator=estimator)
    batched = population_smoothed_grad(model, x, y, sigma=0.01, num_pairs=7, seed=5,
                                       estimator=estimator, chunk_size=chunk_size)
    # the same directions and coefficients; only the float32 summation order differs, so the
    # losses agree to ~1e-6 relative and the estimate (losses / σ·z) to ~1e-6/σ·|z| ≈ 1e-3
    assert torch.allclose(reference.losses_plus, batched.losses_plus, rtol=1e-5, atol=1e-6)
    if estimator == "antithetic":
        assert torch.allclose(reference.losses_minus, batched.losses_minus, rtol=1e-5, atol=1e-6)
    for a, b in zip(reference.grads, batched.grads):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    assert reference.num_forward == batched.num_forward


def test_parameters_untouched_and_deterministic():
    model, x, y = problem()
    before = [p.detach().clone() for p in model.parameters()]
    a = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=4, seed=1)
    b = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=4, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(u, v) for u, v in zip(a.grads, b.grads))


def test_which_models_are_supported():
    assert supports_population(MLP(784, [128], 10))
    assert supports_population(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(),
                                             nn.Linear(3, 2)))
    assert not supports_population(LeNet(1, 10))
    assert not supports_population(ResNet20(10, norm="batch", width=4))
    assert not supports_population(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert choose_population(MLP(8, [4], 2), "cpu") == supports_population(MLP(8, [4], 2))
    with pytest.raises(ValueError, match="not a chain of Linear"):
        population_smoothed_grad(LeNet(1, 10), torch.randn(2, 1, 28, 28), torch.tensor([0, 1]),
                                 sigma=0.1, num_pairs=2, seed=0)
    with pytest.raises(ValueError, match="supports 'antithetic' and 'one_sided'"):
        population_smoothed_grad(MLP(8, [4], 2), torch.randn(2, 8), torch.tensor([0, 1]),
                                 sigma=0.1, num_pairs=2, seed=0, estimator="plain")


def test_non_finite_losses_raise():
    model, x, y = problem()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="pair 0"):
        population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=2, seed=0)

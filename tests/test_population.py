"""The population engine gives the in-place loop's estimate for every supported backbone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.models import MLP, LeNet, ResNet20
from robusttrain.zo.estimators import NonFiniteLossError, estimate_smoothed_grad
from robusttrain.zo.population import (
    choose_population,
    perturbed_losses,
    population_smoothed_grad,
    split_rows,
    supports_population,
    unsupported_reason,
)


def problem(seed=0):
    torch.manual_seed(seed)
    model = MLP(20, [16, 12], 5, dropout=0.1)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    return model, x, y


def backbones():
    torch.manual_seed(0)
    return {
        "mlp": (MLP(20, [16, 12], 5), torch.randn(12, 20)),
        "mlp_tanh": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5, bias=False)),
                     torch.randn(12, 6)),
        "lenet": (LeNet(1, 5, channels=(3, 4), hidden=8), torch.randn(12, 1, 28, 28)),
        "resnet_group": (ResNet20(5, norm="group", width=4, groups=2), torch.randn(6, 3, 32, 32)),
        "resnet_none": (ResNet20(5, norm="none", width=4), torch.randn(6, 3, 32, 32)),
        "resnet_batch_eval": (ResNet20(5, norm="batch", width=4).eval(), torch.randn(6, 3, 32, 32)),
        "layernorm": (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 5)),
                      torch.randn(12, 6)),
    }


def loop_estimate(model, x, y, batch_mode, **options):
    params = [p for p in model.parameters() if p.requires_grad]
    if batch_mode == "split":
        rows = split_rows(x.shape[0], options["num_pairs"])
        return estimate_smoothed_grad(
            lambda i: F.cross_entropy(model(x[rows[i]]), y[rows[i]]), params, pair_loss=True,
            **options,
        )
    return estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, **options)


CASES = [("gaussian", "antithetic", "shared"), ("gaussian", "one_sided", "shared"),
         ("gaussian", "antithetic", "split"), ("lowrank", "antithetic", "shared"),
         ("lowrank", "one_sided", "shared"), ("lowrank", "antithetic", "split")]


@pytest.mark.parametrize("name", list(backbones()))
@pytest.mark.parametrize("perturbation,estimator,batch_mode", CASES)
def test_same_estimate_as_the_loop(name, perturbation, estimator, batch_mode):
    model, x = backbones()[name]
    model.eval()  # dropout frozen, BatchNorm on running statistics
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    options = dict(sigma=0.05, num_pairs=5, seed=3, estimator=estimator,
                   perturbation=perturbation, rank=2)
    reference = loop_estimate(model, x, y, batch_mode, **options)
    for chunk_size in (None, 2):
        batched = population_smoothed_grad(model, x, y, batch_mode=batch_mode,
                                           chunk_size=chunk_size, **options)
        # same directions and coefficients; only the float32 summation order differs: losses
        # agree to ~1e-6 relative, the estimate (losses/σ · z) to ~1e-6/σ·|z| relative to its size
        assert torch.allclose(reference.losses_plus, batched.losses_plus, rtol=1e-5, atol=1e-5)
        if estimator == "antithetic":
            assert torch.allclose(reference.losses_minus, batched.losses_minus, rtol=1e-5,
                                  atol=1e-5)
        for a, b in zip(reference.grads, batched.grads):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        assert reference.num_forward == batched.num_forward


def test_split_mode_costs_two_forward_passes_and_covers_each_pair():
    rows = split_rows(12, 5)
    assert rows.shape == (5, 2) and rows.flatten().tolist() == list(range(10))
    wrapped = split_rows(4, 6)  # more pairs than examples: one each, wrapping around
    assert wrapped.flatten().tolist() == [0, 1, 2, 3, 0, 1]
    model, x, y = problem()
    model.eval()
    est = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=8, seed=0,
                                   batch_mode="split")
    assert est.num_forward == 16 and est.forward_equivalents == pytest.approx(2.0)
    shared = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=8, seed=0)
    assert shared.forward_equivalents == 16


def test_parameters_untouched_and_deterministic():
    model, x, y = problem()
    before = [p.detach().clone() for p in model.parameters()]
    for perturbation in ("gaussian", "lowrank"):
        a = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=4, seed=1,
                                     perturbation=perturbation)
        b = population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=4, seed=1,
                                     perturbation=perturbation)
        assert all(torch.equal(u, v) for u, v in zip(a.grads, b.grads))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_which_models_are_supported():
    assert supports_population(MLP(784, [128], 10))
    assert supports_population(LeNet(1, 10))
    assert supports_population(ResNet20(10, norm="group", width=4))
    assert supports_population(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    # BatchNorm in training mode normalizes over the stacked members: refused, with the reason
    train_bn = ResNet20(10, norm="batch", width=4)
    assert "BatchNorm2d in training mode" in unsupported_reason(train_bn)
    assert not choose_population(train_bn, "cpu")
    # on a CPU the loop is faster for convolutional networks in shared mode (bench_estimator.py)
    assert choose_population(MLP(8, [4], 2), "cpu")
    assert not choose_population(LeNet(1, 10), "cpu")
    assert choose_population(LeNet(1, 10), "cpu", batch_mode="split")
    assert choose_population(LeNet(1, 10), "cuda")
    assert supports_population(train_bn.eval())
    assert "groups=2" in unsupported_reason(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    assert "Embedding" in unsupported_reason(nn.Sequential(nn.Embedding(5, 3)))
    with pytest.raises(ValueError, match="BatchNorm2d in training mode"):
        population_smoothed_grad(ResNet20(10, norm="batch", width=4), torch.randn(2, 3, 32, 32),
                                 torch.tensor([0, 1]), sigma=0.1, num_pairs=2, seed=0)
    with pytest.raises(ValueError, match="supports 'antithetic' and 'one_sided'"):
        population_smoothed_grad(MLP(8, [4], 2), torch.randn(2, 8), torch.tensor([0, 1]),
                                 sigma=0.1, num_pairs=2, seed=0, estimator="plain")
    with pytest.raises(ValueError, match="split.*antithetic"):
        population_smoothed_grad(MLP(8, [4], 2), torch.randn(2, 8), torch.tensor([0, 1]),
                                 sigma=0.1, num_pairs=2, seed=0, estimator="one_sided",
                                 batch_mode="split")


def test_a_model_that_mixes_rows_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)[:2]  # drops rows: the members cannot be followed

    with pytest.raises(RuntimeError, match="rows"):
        perturbed_losses(Mixer(), torch.randn(5, 4), torch.zeros(5, dtype=torch.long),
                         torch.randn(2, 15), sigma=0.1)


def test_a_linear_layer_on_sequences_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(RuntimeError, match="3-D input.*population: false"):
        population_smoothed_grad(model, torch.randn(5, 2, 4), torch.zeros(5, dtype=torch.long),
                                 sigma=0.1, num_pairs=2, seed=0)


def test_non_finite_losses_raise():
    model, x, y = problem()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="pair 0"):
        population_smoothed_grad(model, x, y, sigma=0.1, num_pairs=2, seed=0)

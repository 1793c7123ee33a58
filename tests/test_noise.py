"""Weight-noise models: the perturbation has the statistics its model defines, and is always undone."""

import math

import pytest
import torch
from torch import nn

from robusttrain.models import MLP, LeNet, ResNet20
from robusttrain.noise import draw_directions, draw_noise, noisy_parameters, perturbed_weights


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def deltas(model, **kw):
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    with perturbed_weights(model, **kw):
        return clean, {n: (p.detach() - clean[n]) for n, p in model.named_parameters()}


# For n iid N(0,1) values the sample std has sd ≈ 1/sqrt(2n) and the sample mean sd 1/sqrt(n).
# z = 5 makes a false alarm per check < 6e-7 (two-sided normal tail), negligible over the ~20
# checks below; with the smallest tensor here (1,280 weights) that is |std − 1| < 0.099.
Z = 5.0


@pytest.mark.parametrize("noise", ["relative", "absolute", "multiplicative"])
def test_perturbation_has_the_statistics_of_its_model(noise):
    torch.manual_seed(0)
    model = MLP(784, [256], 10)
    level = 0.1
    clean, delta = deltas(model, noise=noise, level=level, seed=3)
    for name, d in delta.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(d) == 0, "biases are untouched unless asked"
            continue
        w = clean[name]
        if noise == "relative":
            eps = d / (level * w.abs().max())
        elif noise == "absolute":
            eps = d / level
        else:
            keep = w.abs() > 1e-3  # ε is undefined where w = 0
            eps = d[keep] / (level * w[keep])
        n = eps.numel()
        # d is w + δ − w in float32: a relative error ~1e-7/(level·|ε|), far below 1/sqrt(n)
        assert abs(eps.std().item() - 1) < Z / math.sqrt(2 * n), name
        assert abs(eps.mean().item()) < Z / math.sqrt(n), name


def test_a_wrong_scale_would_be_detected():
    # the same check rejects a perturbation 5% too large for the 200k-weight first layer
    model = MLP(784, [256], 10)
    clean, delta = deltas(model, noise="absolute", level=0.105, seed=3)
    eps = delta["net.1.weight"] / 0.1
    assert abs(eps.std().item() - 1) > Z / math.sqrt(2 * eps.numel())


def test_noise_is_one_flat_draw_laid_out_tensor_after_tensor():
    # the convention of robusttrain.noise.seeds.draw_noise: ε = randn(P_total) from the seed
    model = MLP(20, [8], 3)
    tensors = [p for _, p in noisy_parameters(model)]
    directions = draw_directions(tensors, "absolute", torch.Generator().manual_seed(11))
    flat = draw_noise(tensors, torch.Generator().manual_seed(11))
    assert torch.equal(torch.cat([d.flatten() for d in directions]), flat)


def test_same_architecture_gets_the_same_epsilon():
    torch.manual_seed(0)
    a, b = MLP(30, [16], 4), MLP(30, [16], 4)  # different weights, same shapes
    assert not torch.equal(a.net[1].weight, b.net[1].weight)

    def eps(model, seed):
        w = model.net[1].weight.detach().clone()
        with perturbed_weights(model, level=0.2, seed=seed):
            return (model.net[1].weight.detach() - w) / (0.2 * w.abs().max())

    # equal up to the float32 rounding of w + δ − w (|w| <= 0.2, so ~2e-8 / (0.2·max|W|))
    assert torch.allclose(eps(a, 4), eps(b, 4), atol=1e-5)
    assert not torch.allclose(eps(a, 4), eps(a, 5), atol=1e-2)


def test_bias_and_norm_only_when_asked():
    model = ResNet20(10, norm="batch", width=4)
    names = [n for n, _ in noisy_parameters(model)]
    assert names and all(n.endswith("weight") for n in names)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters()}
    assert not any(id(p) in norm_ids for _, p in noisy_parameters(model))
    with_all = noisy_parameters(model, include_bias=True, include_norm=True)
    assert norm_ids <= {id(p) for _, p in with_all}

    mlp = MLP(10, [6], 3)
    _, delta = deltas(mlp, level=0.1, seed=0, include_bias=True)
    assert torch.count_nonzero(delta["net.1.bias"]) == 6


def test_a_shared_parameter_is_perturbed_once():
    first, second = nn.Linear(5, 5), nn.Linear(5, 5)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    assert [n for n, _ in noisy_parameters(model)] == ["0.weight"]


def test_clean_weights_come_back_bit_for_bit_also_after_an_exception():
    model = LeNet(1, 10)
    saved = snapshot(model)
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with perturbed_weights(model, level=0.3, seed=1):
                assert not torch.equal(model.net[0].weight, saved["net.0.weight"])
                raise error
        assert_same(model, saved)


def test_batchnorm_buffers_restored():
    model = ResNet20(10, norm="batch", width=4).train()
    saved = snapshot(model)
    with perturbed_weights(model, level=0.1, seed=1, include_norm=True):
        model(torch.randn(4, 3, 32, 32))  # updates running statistics
    assert_same(model, saved)


def test_level_zero_changes_nothing_and_same_seed_same_draw():
    model = MLP(20, [8], 3)
    saved = snapshot(model)
    with perturbed_weights(model, level=0.0, seed=5):
        assert_same(model, saved)
    _, a = deltas(model, level=0.1, seed=7)
    _, b = deltas(model, level=0.1, seed=7)
    _, c = deltas(model, level=0.1, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.1.weight"], c["net.1.weight"])


def test_global_rng_is_untouched():
    model = MLP(20, [8], 3)
    state = torch.get_rng_state()
    with perturbed_weights(model, level=0.1, seed=2):
        pass
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise="gaussian", level=0.1), "unknown noise model 'gaussian'; choose one of relative"),
        (dict(level=-0.1), ">= 0"),
        (dict(level=float("nan")), ">= 0"),
        (dict(level=float("inf")), ">= 0"),
        (dict(level="0.1"), ">= 0"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with perturbed_weights(MLP(4, [3], 2), seed=0, **kwargs):
            pass


def test_model_without_weights_is_an_error():
    with pytest.raises(ValueError, match="no Linear/Conv weights"):
        with perturbed_weights(nn.Sequential(nn.ReLU()), level=0.1, seed=0):
            pass

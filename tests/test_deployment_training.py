"""Training for a deployment: the straight-through step, the zeroth-order step through the
deployed network, validation through it, fine-tuning starts, exact resume, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from blob_problem import blobs, loaders, sgd, trainer
from torch.utils.data import DataLoader, TensorDataset

from robusttrain.models import MLP
from robusttrain.noise import noisy_parameters
from robusttrain.noise.deployment import (
    OutputQuantize,
    deploy_weights_,
    deployed,
    output_converters,
    parse_deployment,
)
from robusttrain.training import (
    Classifier,
    QuantizationAwareClassifier,
    ZerothOrderClassifier,
)
from robusttrain.training.base import EVAL_CHIP as _EVAL_CHIP
from robusttrain.training.base import deployment_seeds as _deployment_seeds
from robusttrain.training.base import step_seed as _step_seed
from robusttrain.zo.estimators import estimate_smoothed_grad

pytestmark = pytest.mark.usefixtures("single_thread")

NOISY = [{"kind": "quantize", "bits": 2, "per_channel": True, "clip": 2.5},
         {"kind": "stuck_at", "p": 0.1},
         {"kind": "read_noise", "noise": "relative", "level": 0.05},
         {"kind": "output_quantize", "bits": 6}]


def _backbone():
    torch.manual_seed(0)
    return MLP(8, [16], 3)


# ----- the deployment pieces training uses ------------------------------------------------------


def test_deploy_weights_writes_what_deployed_holds_and_one_read_noise_draw():
    model = _backbone()
    dep = parse_deployment(NOISY[:2])
    with deployed(model, dep, device_seed=5) as m:
        expected = [w.detach().clone() for _, w in noisy_parameters(m)]
    weights = [w.detach().clone() for _, w in noisy_parameters(model)]
    deploy_weights_(weights, dep, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected))

    # one read-noise draw: w_dep + level * max|w_dep| * eps, eps standard normal
    big = [torch.randn(400, 300, generator=torch.Generator().manual_seed(1))]
    base = [big[0].clone()]
    deploy_weights_(base, [{"kind": "quantize", "bits": 4}], torch.Generator().manual_seed(0))
    noisy = [big[0].clone()]
    deploy_weights_(noisy, [{"kind": "quantize", "bits": 4},
                            {"kind": "read_noise", "noise": "relative", "level": 0.05}],
                    torch.Generator().manual_seed(0), torch.Generator().manual_seed(2))
    eps = (noisy[0] - base[0]) / (0.05 * base[0].abs().max())
    n = eps.numel()
    # mean within 4.5 standard errors of 0, std within 4.5 standard errors (√(1/2n)) of 1
    assert abs(eps.mean().item()) < 4.5 / n ** 0.5
    assert abs(eps.std().item() - 1) < 4.5 / (2 * n) ** 0.5


def test_straight_through_converter_keeps_the_values_and_passes_the_gradient():
    y = torch.randn(50, 7, requires_grad=True)
    converter = OutputQuantize(3)
    out = converter.quantize(y, straight_through=True)
    torch.testing.assert_close(out, converter.quantize(y.detach()), rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))
    # without it, rounding has zero gradient
    z = y.detach().clone().requires_grad_(True)
    converter.quantize(z).sum().backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0

    model = _backbone()
    x = torch.randn(5, 8)
    with output_converters(model, [{"kind": "output_quantize", "bits": 2}]):
        inside = model(x)
    assert inside.unique().numel() <= 3  # 2-bit outputs: {−Δ, 0, Δ}
    assert torch.equal(model(x), _backbone()(x))  # the hooks are gone


# ----- quantization-aware training --------------------------------------------------------------


def test_qat_step_takes_the_gradient_at_one_draw_of_the_deployed_weights(tmp_path):
    x, y = blobs(n=64)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    before = _backbone()
    lr, seed = 0.5, 11
    model = QuantizationAwareClassifier(copy.deepcopy(before), optimizer=sgd(lr), seed=seed,
                                        deployment=NOISY)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0).fit(model, train)

    by_hand = copy.deepcopy(before)
    chip, reads = _deployment_seeds(_step_seed(seed, 0), 0)
    deploy_weights_([w for _, w in noisy_parameters(by_hand)], NOISY,
                    torch.Generator().manual_seed(chip), torch.Generator().manual_seed(reads))
    with output_converters(by_hand, NOISY, straight_through=True):
        F.cross_entropy(by_hand(x), y).backward()
    for p0, pd, p1 in zip(before.parameters(), by_hand.parameters(), model.backbone.parameters()):
        torch.testing.assert_close(p1, p0 - lr * pd.grad)
    # the float gradient gives another step: the test tells them apart
    float_model = copy.deepcopy(before)
    F.cross_entropy(float_model(x), y).backward()
    w0 = next(before.parameters())
    assert not torch.allclose(w0 - lr * next(float_model.parameters()).grad,
                              next(model.backbone.parameters()), atol=1e-4)


def test_qat_needs_a_deployment():
    with pytest.raises(ValueError, match="needs a deployment to train through"):
        QuantizationAwareClassifier(_backbone())


# ----- zeroth order through the deployment ------------------------------------------------------


def test_zeroth_order_step_estimates_the_gradient_of_the_deployed_loss(tmp_path):
    x, y = blobs(n=64)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    before = _backbone()
    lr, seed, pairs, sigma = 0.05, 4, 3, 0.05
    model = ZerothOrderClassifier(copy.deepcopy(before), optimizer=sgd(lr), seed=seed,
                                  num_pairs=pairs, sigma=sigma, deployment=NOISY)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0).fit(model, train)

    # by hand: pair i runs on chip/read-noise seeds number i of the step, both members alike
    by_hand = copy.deepcopy(before)
    step = _step_seed(seed, 0)

    def loss(i):
        chip, reads = _deployment_seeds(step, i)
        with deployed(by_hand, NOISY, device_seed=chip, inference_seed=reads):
            return F.cross_entropy(by_hand(x), y)

    params = list(by_hand.parameters())
    estimate = estimate_smoothed_grad(loss, params, sigma=sigma, num_pairs=pairs, seed=step,
                                      pair_loss=True)
    for p0, g, p1 in zip(before.parameters(), estimate.grads, model.backbone.parameters()):
        torch.testing.assert_close(p1, p0 - lr * g)
    assert any(g.abs().max() > 0 for g in estimate.grads)
    # 2N members + the logged clean pass + the logged deployed pass
    assert model._forward_passes == 2 * pairs + 2


def test_zeroth_order_through_a_deployment_learns_and_validates_through_it(tmp_path):
    train, val = loaders()
    model = ZerothOrderClassifier(_backbone(), optimizer=sgd(0.02, momentum=0.9, nesterov=True),
                                  num_pairs=16, sigma=0.05, seed=1, deployment="int4_noisy")
    t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
    t.fit(model, train, val)
    metrics = t.callback_metrics
    # 3 separable blobs: chance is 1/3
    assert metrics["val/acc"] > 0.9
    # val/acc is the accuracy of the deployed model on the run's evaluation chip
    xv, yv = blobs()[0][384:], blobs()[1][384:]
    chip, _ = _deployment_seeds(1, _EVAL_CHIP)
    _, reads = _deployment_seeds(chip, 0)
    model.eval()
    with torch.no_grad(), deployed(model.backbone, "int4_noisy", device_seed=chip,
                                   inference_seed=reads):
        deployed_acc = (model.backbone(xv).argmax(1) == yv).float().mean()
    with torch.no_grad():
        float_acc = (model.backbone(xv).argmax(1) == yv).float().mean()
    torch.testing.assert_close(metrics["val/acc"], deployed_acc)
    torch.testing.assert_close(metrics["val/float_acc"], float_acc)


def test_zeroth_order_through_a_deployment_resumes_exactly(tmp_path):
    train, val = loaders()
    opt = sgd(0.002, momentum=0.9, nesterov=True)

    def make():
        return ZerothOrderClassifier(_backbone(), optimizer=opt, num_pairs=3, sigma=0.05, seed=2,
                                     deployment=NOISY, noise="relative", level=0.1)

    full = make()
    trainer(tmp_path / "full", max_epochs=2, enable_checkpointing=False).fit(full, train, val)
    first = make()
    t1 = trainer(tmp_path / "a", max_epochs=1)
    t1.fit(first, train, val)
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    resumed = make()
    trainer(tmp_path / "b", max_epochs=2).fit(resumed, train, val, ckpt_path=tmp_path / "e1.ckpt")
    for a, b in zip(full.backbone.parameters(), resumed.backbone.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, message", [
    ({"estimator": "one_sided"}, "needs estimator 'antithetic'"),
    ({"population": True}, "population=True cannot train through a deployment"),
    ({"deployment": "int5"}, "neither a preset"),
])
def test_zeroth_order_deployment_settings_are_checked(bad, message):
    settings = {"deployment": "int4", **bad}
    with pytest.raises(ValueError, match=message):
        ZerothOrderClassifier(_backbone(), **settings)


# ----- validation through the deployment, fine-tuning starts ------------------------------------


def test_plain_backprop_with_a_deployment_validates_the_quantized_model(tmp_path):
    train, val = loaders()
    model = Classifier(_backbone(), optimizer=sgd(0.1), deployment="int2", seed=5)
    t = trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    t.fit(model, train, val)
    xv, yv = blobs()[0][384:], blobs()[1][384:]
    model.eval()
    with torch.no_grad():
        float_acc = (model.backbone(xv).argmax(1) == yv).float().mean()
        with deployed(model.backbone, "int2"):
            int2_acc = (model.backbone(xv).argmax(1) == yv).float().mean()
    torch.testing.assert_close(t.callback_metrics["val/float_acc"], float_acc)
    torch.testing.assert_close(t.callback_metrics["val/acc"], int2_acc)


def test_init_from_starts_from_the_checkpoint_weights_and_rejects_a_mismatch(tmp_path):
    train, val = loaders()
    source = Classifier(_backbone(), optimizer=sgd(0.1))
    t = trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    t.fit(source, train, val)
    path = tmp_path / "source.ckpt"
    t.save_checkpoint(path)

    torch.manual_seed(123)
    started = ZerothOrderClassifier(MLP(8, [16], 3), init_from=str(path), deployment="int4")
    for a, b in zip(source.backbone.parameters(), started.backbone.parameters()):
        assert torch.equal(a, b)
    assert started.robusttrain_meta()["init_from"] == str(path)
    with pytest.raises(ValueError, match="does not fit this run's backbone"):
        Classifier(MLP(8, [32], 3), init_from=str(path))
    with pytest.raises(ValueError, match="init_from: .*does not exist"):
        Classifier(MLP(8, [16], 3), init_from=str(tmp_path / "missing.ckpt"))

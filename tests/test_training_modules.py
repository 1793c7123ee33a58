"""The LightningModules on small synthetic problems (real-data training lives in test_training.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from blob_problem import blobs, loaders, sgd, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robusttrain.models import MLP
from robusttrain.training import (
    Classifier,
    NoiseInjectionClassifier,
    ZerothOrderClassifier,
    frozen_stochastic_layers,
    load_checkpoint,
)
from robusttrain.training.base import step_seed as _step_seed


def test_backprop_classifier_learns_blobs(tmp_path):
    train, val = loaders()
    model = Classifier(MLP(8, [16], 3), optimizer=sgd(0.1, momentum=0.9))
    t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
    t.fit(model, train, val)
    # chance is 1/3; the blobs are 4 sd apart, a trained MLP is near perfect
    assert t.callback_metrics["val/acc"] > 0.9


def test_zeroth_order_classifier_learns_blobs(tmp_path):
    train, val = loaders()
    torch.manual_seed(0)
    model = ZerothOrderClassifier(
        MLP(8, [16], 3), optimizer=sgd(0.02, momentum=0.9, nesterov=True), sigma=0.01, num_pairs=16
    )
    t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
    t.fit(model, train, val)
    assert t.callback_metrics["val/acc"] > 0.9
    # 6 steps per epoch, each 2N perturbed forwards + 1 clean forward
    assert model._forward_passes == 5 * 6 * (2 * 16 + 1)


def test_num_classes_must_be_known():
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(nn.Linear(4, 3))
    assert Classifier(nn.Linear(4, 3), num_classes=3).num_classes == 3


@pytest.mark.parametrize("bad", [dict(sigma=0.0), dict(sigma=float("nan")), dict(num_pairs=0)])
def test_zeroth_order_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        ZerothOrderClassifier(MLP(8, [4], 3), **bad)


def test_zeroth_order_resume_matches_uninterrupted_run(tmp_path):
    """Perturbation seeds derive from (seed, global step): a resumed run continues identically."""
    train, val = loaders()
    torch.manual_seed(0)
    backbone = MLP(8, [16], 3)
    opt = sgd(0.1, momentum=0.9, nesterov=True)

    full = ZerothOrderClassifier(copy.deepcopy(backbone), optimizer=opt, num_pairs=4, seed=3)
    trainer(tmp_path / "full", max_epochs=2, enable_checkpointing=False).fit(full, train, val)

    first = ZerothOrderClassifier(copy.deepcopy(backbone), optimizer=opt, num_pairs=4, seed=3)
    t1 = trainer(tmp_path / "a", max_epochs=1)
    t1.fit(first, train, val)
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = ZerothOrderClassifier(copy.deepcopy(backbone), optimizer=opt, num_pairs=4, seed=3)
    trainer(tmp_path / "b", max_epochs=2).fit(resumed, train, val, ckpt_path=ckpt)

    for a, b in zip(full.backbone.parameters(), resumed.backbone.parameters()):
        assert torch.equal(a, b)
    assert resumed._forward_passes == full._forward_passes
    # and the seed matters: a different seed gives different weights
    other = ZerothOrderClassifier(copy.deepcopy(backbone), optimizer=opt, num_pairs=4, seed=4)
    trainer(tmp_path / "c", max_epochs=1, enable_checkpointing=False).fit(other, train, val)
    assert not torch.equal(other.backbone.net[1].weight, first.backbone.net[1].weight)


def test_noise_injection_step_uses_gradient_at_perturbed_point(tmp_path):
    x, y = blobs(n=64)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    torch.manual_seed(0)
    backbone = MLP(8, [16], 3)
    before = copy.deepcopy(backbone)
    sigma, lr, seed = 0.1, 0.5, 7
    model = NoiseInjectionClassifier(backbone, optimizer=sgd(lr), sigma=sigma, seed=seed)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0).fit(model, train)

    # the same step by hand: gradient at theta + sigma*g with g from the step-0 seed
    from robusttrain.noise.seeds import draw_noise

    params = list(before.parameters())
    g = draw_noise(params, torch.Generator().manual_seed(_step_seed(seed, 0)))
    perturbed = copy.deepcopy(before)
    with torch.no_grad():
        offset = 0
        for p in perturbed.parameters():
            p.add_(g[offset : offset + p.numel()].view_as(p), alpha=sigma)
            offset += p.numel()
    F.cross_entropy(perturbed(x), y).backward()
    for p0, pg, p1 in zip(params, perturbed.parameters(), model.backbone.parameters()):
        torch.testing.assert_close(p1, p0 - lr * pg.grad)
    # the clean-point gradient gives a different step, so the test can tell them apart
    clean = copy.deepcopy(before)
    F.cross_entropy(clean(x), y).backward()
    w_clean = params[0] - lr * next(clean.parameters()).grad
    assert not torch.allclose(w_clean, next(model.backbone.parameters()))


def test_frozen_stochastic_layers_keep_bn_statistics_and_disable_dropout():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    model.train()
    bn, drop = model[1], model[2]
    model(torch.randn(32, 4))  # some running statistics
    state = copy.deepcopy(bn.state_dict())
    momentum = bn.momentum
    x = torch.randn(32, 4)
    with frozen_stochastic_layers(model):
        assert not drop.training and bn.training
        out1, out2 = model(x), model(x)
        torch.testing.assert_close(out1, out2)  # dropout frozen, BN uses batch stats
    for k, v in state.items():
        assert torch.equal(bn.state_dict()[k], v), k
    assert bn.momentum == momentum and drop.training
    model(x)  # outside, statistics move again
    assert not torch.equal(bn.running_mean, state["running_mean"])


def test_checkpoint_roundtrip_through_trainer(tmp_path):
    train, val = loaders()
    model = Classifier(MLP(8, [16], 3), optimizer=sgd(0.1))
    t = trainer(tmp_path, max_epochs=1)
    t.fit(model, train, val)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = load_checkpoint(path)
    assert loaded.meta["method"] == "backprop"
    assert not loaded.backbone.training
    for a, b in zip(loaded.backbone.parameters(), model.backbone.parameters()):
        assert torch.equal(a, b)
    # the file also loads with plain weights-only torch.load (no code runs)
    torch.load(path, weights_only=True)


@pytest.mark.parametrize("population", [False, True])
def test_zeroth_order_with_adam_and_both_paths_agree(tmp_path, population):
    # Adam consumes the estimate like any torch.optim optimizer; the batched MLP path and the
    # in-place loop give the same training run up to float rounding
    train, val = loaders()
    results = {}
    for path in (False, True):
        torch.manual_seed(0)
        model = ZerothOrderClassifier(
            MLP(8, [16], 3), optimizer=lambda p: torch.optim.Adam(p, lr=0.03), sigma=0.01,
            num_pairs=8, population=path,
        )
        t = trainer(tmp_path, max_epochs=3, enable_checkpointing=False)
        t.fit(model, train, val)
        results[path] = (float(t.callback_metrics["val/acc"]),
                         torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert results[population][0] > 0.9
    assert torch.allclose(results[False][1], results[True][1], atol=1e-4)


def test_non_finite_perturbed_loss_stops_or_skips(tmp_path):
    train, val = loaders()
    for skip in (False, True):
        model = ZerothOrderClassifier(MLP(8, [16], 3), optimizer=sgd(0.01), sigma=1e30,
                                      num_pairs=2, population=False, skip_nonfinite=skip)
        before = [p.detach().clone() for p in model.parameters()]
        t = trainer(tmp_path, max_epochs=1, limit_train_batches=2, enable_checkpointing=False)
        if not skip:
            with pytest.raises(FloatingPointError, match="(?i)lower the learning rate or sigma"):
                t.fit(model, train, val)
        else:
            t.fit(model, train, val)
            assert model._skipped_steps == 2
        # the weights were never touched by a non-finite step
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("batch_mode", ["shared", "split"])
def test_lowrank_zeroth_order_learns_and_both_paths_agree(tmp_path, batch_mode):
    # low-rank directions through the population engine and through the in-place loop give the
    # same run up to float rounding, in both ways of meeting the examples; both learn the blobs
    train, val = loaders()
    results = {}
    for population in (False, True):
        torch.manual_seed(0)
        model = ZerothOrderClassifier(
            MLP(8, [16], 3), optimizer=sgd(0.02, momentum=0.9, nesterov=True), sigma=0.01,
            num_pairs=16, perturbation="lowrank", rank=1, batch_mode=batch_mode,
            population=population,
        )
        t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
        t.fit(model, train, val)
        results[population] = (float(t.callback_metrics["val/acc"]),
                               torch.cat([p.detach().flatten() for p in model.parameters()]),
                               model._forward_passes)
    assert results[True][0] > 0.9
    assert torch.allclose(results[False][1], results[True][1], atol=1e-4)
    # forward-pass equivalents: 30 steps of (2N member passes of B or of B/N examples) + 1 clean
    per_step = 2 * 16 + 1 if batch_mode == "shared" else 2 + 1
    assert results[True][2] == pytest.approx(5 * 6 * per_step)
    assert results[False][2] == pytest.approx(results[True][2])


def test_zscore_fitness_shaping_learns_in_split_mode(tmp_path):
    # z-scored losses (EGGROLL's recipe): each pair sees 4 of the 64 examples, and the step size
    # is set by the learning rate alone, whatever the spread of the losses
    train, val = loaders()
    torch.manual_seed(0)
    model = ZerothOrderClassifier(
        MLP(8, [16], 3), optimizer=sgd(0.002, momentum=0.9), sigma=0.01, num_pairs=32,
        perturbation="lowrank", batch_mode="split", fitness_shaping="zscore",
    )
    t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
    t.fit(model, train, val)
    assert t.callback_metrics["val/acc"] > 0.9


@pytest.mark.parametrize("bad", [dict(perturbation="sparse"), dict(perturbation="lowrank", rank=0),
                                 dict(batch_mode="halves"), dict(fitness_shaping="softmax"),
                                 dict(batch_mode="split", estimator="one_sided")])
def test_zeroth_order_rejects_bad_family_settings(bad):
    with pytest.raises(ValueError, match="perturbation|rank|batch_mode|fitness_shaping|split"):
        ZerothOrderClassifier(MLP(8, [16], 3), **bad)


def test_population_true_on_batchnorm_in_training_mode_says_why(tmp_path):
    from robusttrain.models import ResNet20

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = ZerothOrderClassifier(ResNet20(10, norm="batch", width=4), optimizer=sgd(0.01),
                                  num_pairs=2, population=True)
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="BatchNorm2d in training mode.*population: null"):
        t.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    # population: null picks the in-place loop for it and trains
    auto = ZerothOrderClassifier(ResNet20(10, norm="batch", width=4), optimizer=sgd(0.01),
                                 num_pairs=2, population=None)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0).fit(
        auto, DataLoader(TensorDataset(x, y), batch_size=8))
    assert auto.global_step == 1


def test_node_perturbation_learns_blobs_and_resumes_exactly(tmp_path):
    # node perturbation (the Rao–Blackwellized per-example weight noise) through the module: it
    # learns, counts 2N member passes + 1 clean per step, and a resumed run continues bit for bit
    train, val = loaders()

    def run(name, max_epochs, ckpt=None):
        torch.manual_seed(0)
        model = ZerothOrderClassifier(
            MLP(8, [16], 3), optimizer=sgd(0.05, momentum=0.9), sigma=0.01, num_pairs=2,
            perturbation="node",
        )
        t = trainer(tmp_path / name, max_epochs=max_epochs, enable_checkpointing=False)
        t.fit(model, train, val, ckpt_path=ckpt)
        return t, model

    t, model = run("full", 5)
    assert t.callback_metrics["val/acc"] > 0.9
    assert model._forward_passes == 5 * 6 * (2 * 2 + 1)
    first, _ = run("first", 2)
    first.save_checkpoint(tmp_path / "epoch2.ckpt")
    _, resumed = run("resumed", 5, ckpt=tmp_path / "epoch2.ckpt")
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, message", [
    (dict(fitness_shaping=True), "fitness_shaping"),
    (dict(batch_mode="split"), "batch_mode"),
    (dict(estimator="one_sided"), "antithetic"),
    (dict(parallel="population"), "parallel"),
    (dict(population=True), "population"),
    (dict(orthogonal=True), "orthogonal directions are for"),
    (dict(deployment="int4"), "deployment"),
])
def test_node_perturbation_refuses_what_it_cannot_take(bad, message):
    with pytest.raises(ValueError, match=message):
        ZerothOrderClassifier(MLP(8, [16], 3), perturbation="node", **bad)


def test_node_perturbation_names_an_unsupported_backbone():
    with pytest.raises(ValueError, match="LayerNorm holds trainable parameters"):
        ZerothOrderClassifier(nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 3)),
                              num_classes=3, perturbation="node")


@pytest.mark.parametrize("population", [False, True])
def test_orthogonal_directions_learn_blobs_on_both_paths(tmp_path, population):
    train, val = loaders()
    torch.manual_seed(0)
    model = ZerothOrderClassifier(
        MLP(8, [16], 3), optimizer=sgd(0.02, momentum=0.9, nesterov=True), sigma=0.01,
        num_pairs=16, orthogonal=True, population=population,
    )
    t = trainer(tmp_path, max_epochs=5, enable_checkpointing=False)
    t.fit(model, train, val)
    assert t.callback_metrics["val/acc"] > 0.9
    assert model.robusttrain_meta()["orthogonal"] is True

"""The learned zeroth-order optimizer (ZO-L2L): the shapes its RNNs take and give, the estimate with
learned sampling scales (unbiased for S²∇ℓ_S, not for ∇ℓ, statistically), meta-training (it lowers
the attack loss on held-out images and trains only its own stage), saving and loading, exact query
counting in ``run_attack``, and the ``meta-train`` and ``attack --learned`` commands."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from torch import nn

from robusttrain.commands import attack as attack_command
from robusttrain.commands import meta_train as meta_train_command
from robusttrain.commands.robustness import checkpoints_and_data
from robusttrain.evaluation.attack import (
    PixelModel,
    coordinate_scale,
    margin_loss,
    mean_loss_at_step,
    project,
    run_attack,
    zo_input_gradient,
)
from robusttrain.evaluation.zo_l2l import (
    FORMAT,
    LearnedZOOptimizer,
    load_learned,
    meta_train,
    save_learned,
)
from robusttrain.noise.seeds import pair_seed
from tests.test_attack import _checkpoint, _Linear2

pytestmark = pytest.mark.usefixtures("single_thread")

PIXELS = 16  # in a toy image
# meta-training settings of the toy problem: 20 steps of 10 pairs in two unrolls, 16 images
META = {"eps": 0.05, "iterations": 20, "unroll": 10, "batch_size": 16, "num_pairs": 10,
        "lr": 0.01, "log": None}


def _fresh(hidden_size: int = 10) -> LearnedZOOptimizer:
    """An untrained optimizer with seeded LSTM weights."""
    torch.manual_seed(0)
    return LearnedZOOptimizer(hidden_size=hidden_size)


def _toy_model() -> nn.Module:
    """A fixed linear 3-class model on PIXELS pixels, its logits 0 at the grey image (0.5)."""
    torch.manual_seed(0)
    model = nn.Linear(PIXELS, 3)
    with torch.no_grad():
        model.weight.mul_(4.0)  # margins of about 0.15 on the images below
        model.bias.copy_(-0.5 * model.weight.sum(dim=1))  # each class wins about a third
    return model


def _toy_images(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images uniform in [0.3, 0.7] and the class the model gives them (all right)."""
    x = 0.3 + 0.4 * torch.rand(n, PIXELS, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(dim=1)


def _params(learned: LearnedZOOptimizer, rnn: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters of the ``"update"`` or ``"query"`` RNN (its LSTM and output)."""
    return {k: v.clone() for k, v in learned.state_dict().items() if k.startswith(f"{rnn}_")}


def _randomize_queries(learned: LearnedZOOptimizer) -> None:
    """Give the QueryRNN a non-zero output layer, so that its scales s differ from 1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        learned.query_out.weight.normal_(generator=g)
        learned.query_out.bias.normal_(std=0.3, generator=g)


@pytest.fixture(scope="module")
def toy():
    """The toy model and 256 training images."""
    model = _toy_model()
    return model, *_toy_images(model, 256, seed=1)


@pytest.fixture(scope="module")
def trained(toy):
    """An optimizer meta-trained on the toy problem in both stages, and its history (shared by
    the tests: none changes it)."""
    model, x, y = toy
    learned = _fresh(hidden_size=6)
    history = meta_train(learned, model, x, y, stage="update", episodes=10, **META)
    history += meta_train(learned, model, x, y, stage="query", episodes=3, **META)
    return learned, history


# --- shapes ---------------------------------------------------------------------------------------


def test_initial_state_and_the_rnns_have_the_documented_shapes():
    learned = _fresh()
    b, d, hidden = 3, 7, learned.hidden_size
    state = learned.initial_state(b, d)
    for t in (state.update_h, state.update_c, state.query_h, state.query_c):
        assert t.shape == (b, d, hidden) and not t.any()
    assert state.last_g.shape == state.last_step.shape == (b, d)
    g = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
    step, after_update = learned.update(g, torch.zeros(b, d), state)
    assert step.shape == (b, d)
    assert after_update.update_h.shape == after_update.update_c.shape == (b, d, hidden)
    assert torch.equal(after_update.last_g, g) and torch.equal(after_update.last_step, step)
    assert after_update.query_h is state.query_h  # the UpdateRNN leaves the QueryRNN's memory
    s, penalty, after_query = learned.sampling_scale(after_update)
    assert s.shape == (b, d) and penalty.shape == ()
    assert after_query.query_h.shape == after_query.query_c.shape == (b, d, hidden)
    assert after_query.update_h is after_update.update_h


@pytest.mark.parametrize("dims", [1, 10, 16, 784])
def test_an_untrained_query_rnn_samples_standard_directions_exactly(dims):
    learned = _fresh()
    state = learned.initial_state(4, dims)
    g = torch.Generator().manual_seed(dims)
    state.last_g.normal_(generator=g)  # inputs that would move s if the output layer were not 0
    state.last_step.normal_(generator=g)
    s, penalty, _ = learned.sampling_scale(state)
    assert torch.equal(s, torch.ones(4, dims)) and penalty.item() == 0.0


def test_sampling_scales_are_positive_with_norm_root_d_and_a_trainable_penalty():
    learned = _fresh()
    _randomize_queries(learned)
    with torch.no_grad():
        learned.query_out.bias.fill_(-1.0)  # 1 + o straddles 0: the scale must be |1 + o|
    b, d = 5, 12
    state = learned.initial_state(b, d)
    g = torch.Generator().manual_seed(2)
    state.last_g.normal_(generator=g)
    state.last_step.normal_(generator=g)
    s, penalty, _ = learned.sampling_scale(state)
    assert s.shape == (b, d) and (s > 0).all()
    assert s.std() > 0.1  # the QueryRNN does change the scales, so the norm check is not idle
    torch.testing.assert_close(s.norm(dim=1), torch.full((b,), d ** 0.5))
    # λ·mean(o²) > 0, and meta-training can lower it through the QueryRNN's output layer
    assert penalty > 0
    penalty.backward()
    assert learned.query_out.weight.grad.abs().sum() > 0


def _image_step(learned: LearnedZOOptimizer, use_query: bool):
    """One step of ``learned`` (unit 0.1) on two 1×4×4 images of a two-class linear model."""
    model = _Linear2(torch.ones(PIXELS) / PIXELS, 0.5)
    x = torch.full((2, 1, 4, 4), 0.55)
    y = torch.zeros(2, dtype=torch.long)

    def losses(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return margin_loss(model(x[rows] + d), y[rows])

    delta = torch.linspace(-0.1, 0.1, 32).view_as(x)
    moved, state, penalty = learned.step(
        losses, delta, torch.arange(2), learned.initial_state(2, PIXELS), num_pairs=3,
        sigma=0.01, unit=0.1, generator=torch.Generator().manual_seed(0), use_query=use_query)
    return delta, moved, state, penalty


@pytest.mark.parametrize("use_query", [False, True])
def test_a_step_takes_image_shaped_perturbations(use_query):
    learned = _fresh()
    _randomize_queries(learned)
    positions = []
    update = learned.update

    def recording_update(g, position, state):
        positions.append(position)
        return update(g, position, state)

    learned.update = recording_update
    delta, moved, state, penalty = _image_step(learned, use_query)
    # the UpdateRNN reads where each coordinate sits, in units of the threat set
    torch.testing.assert_close(positions[0], delta.flatten(1) / 0.1)
    assert moved.shape == delta.shape == (2, 1, 4, 4)
    assert state.last_g.shape == state.last_step.shape == (2, PIXELS)
    assert state.update_h.shape == (2, PIXELS, learned.hidden_size)
    # δ moves by unit·Δ, Δ the UpdateRNN's step kept in the state
    torch.testing.assert_close((moved - delta).flatten(1) / 0.1, state.last_step)
    assert state.query_h.any() == use_query  # the QueryRNN ran only when asked
    assert (penalty > 0) == use_query


def test_an_untrained_query_rnn_gives_the_same_step_as_standard_directions():
    learned = _fresh()
    _, plain, plain_state, _ = _image_step(learned, use_query=False)
    _, queried, queried_state, _ = _image_step(learned, use_query=True)
    assert torch.equal(plain, queried)
    assert torch.equal(plain_state.last_g, queried_state.last_g)


# --- the estimate with per-coordinate scales ------------------------------------------------------


def _scaled_estimates(images: int = 8000, q: int = 4):
    """ĝ with scales s at one point δ₀ of ℓ(δ) = a·δ + ½δᵀAδ, once per row.

    Returns (ĝ (images, d), ∇ℓ(δ₀) = a + Aδ₀, s, q). Smoothing a quadratic only adds a constant, so
    ∇ℓ_S = ∇ℓ and the target S²∇ℓ_S is s² ⊙ (a + Aδ₀).
    """
    d = 8
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.arange(d) % 3 == 0, -1.0, 1.0)
    a = (0.5 + torch.rand(d, generator=g)) * sign  # |a_j| in [0.5, 1.5]
    m = 0.1 * torch.randn(d, d, generator=g)
    hessian = m + m.T
    point = 0.2 * torch.randn(d, generator=g)
    s = torch.where(torch.arange(d) % 2 == 0, 0.5, 1.75 ** 0.5)  # mean s² = 1: ‖s‖ = √d

    def loss(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return delta @ a + 0.5 * ((delta @ hessian) * delta).sum(dim=1)

    estimate = zo_input_gradient(loss, point.expand(images, d).clone(), torch.arange(images),
                                 num_pairs=q, sigma=0.05, generator=torch.Generator().manual_seed(1),
                                 scale=s.expand(images, d))
    return estimate, a + hessian @ point, s, q


def _standard_error(s: torch.Tensor, grad: torch.Tensor, q: int, images: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SE of the mean over rows of ĝ_j, and the variance of one row.

    The antithetic difference of a quadratic is exactly 2σ ∇ℓ·u, so one row is
    ĝ = (1/q) Σ_i (c·g_i) s ⊙ g_i with c = s ⊙ ∇ℓ, g_i ~ N(0, I); by Isserlis
    E[(c·g)² g_j²] = ‖c‖² + 2c_j², so Var ĝ_j = s_j²(‖c‖² + c_j²)/q and SE_j = √(Var ĝ_j / rows).
    """
    c = s * grad
    variance = s.pow(2) * (c.pow(2).sum() + c.pow(2)) / q
    return (variance / images).sqrt(), variance


def test_scaled_estimate_is_unbiased_for_the_preconditioned_gradient_of_its_smoothing():
    estimate, grad, s, q = _scaled_estimates()
    images = estimate.shape[0]
    se, variance = _standard_error(s, grad, q, images)
    target = s.pow(2) * grad  # S²∇ℓ_S
    assert ((estimate.mean(dim=0) - target).abs() <= 5 * se).all()
    # the predicted variance is the rows' variance: the mean squared deviation from the target
    # lies within 5 of its own standard errors (spread of the squared deviations / √rows)
    squared = (estimate - target).pow(2)
    assert ((squared.mean(dim=0) - variance).abs()
            <= 5 * squared.std(dim=0) / images ** 0.5).all()


def test_scaled_estimate_is_not_unbiased_for_the_plain_gradient():
    estimate, grad, s, q = _scaled_estimates()
    se, _ = _standard_error(s, grad, q, estimate.shape[0])
    # E ĝ − ∇ℓ = (s² − 1) ⊙ ∇ℓ = ±0.75·∇ℓ here, over 15 standard errors on every coordinate ...
    assert ((s.pow(2) - 1).abs() >= 0.75 - 1e-6).all()
    assert (((s.pow(2) - 1) * grad).abs() > 15 * se).all()
    # ... and the estimates do miss ∇ℓ by that much (more than 10 SE; within 5 SE of S²∇ℓ above)
    assert ((estimate.mean(dim=0) - grad).abs() > 10 * se).all()


# --- meta-training --------------------------------------------------------------------------------


def _held_out_losses(learned: LearnedZOOptimizer, model: nn.Module, steps: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack loss of 64 fixed held-out toy images at δ = 0 and after ``steps`` steps."""
    x, y = _toy_images(model, 64, seed=2)
    q = META["num_pairs"]
    result = run_attack(model, x, y, eps=META["eps"], optimizer="zo_l2l", learned=learned,
                        num_pairs=q, max_queries=1 + steps * (2 * q + 1), seed=5)
    assert mean_loss_at_step(result, steps) == pytest.approx(float(result.loss_trace[steps].mean()))
    return result.loss_trace[0], result.loss_trace[steps]


def test_meta_training_lowers_the_attack_loss_on_held_out_images(toy):
    model, x, y = toy
    learned = _fresh()
    start, before = _held_out_losses(learned, model)
    history = meta_train(learned, model, x, y, stage="update", episodes=10, **META)
    assert len(history) == 10 and all(h["stage"] == "update" for h in history)
    _, after = _held_out_losses(learned, model)
    # paired over the same images: the mean improvement exceeds 5 standard errors (std/√n) ...
    gain = before - after
    assert gain.mean() > 5 * gain.std() / len(gain) ** 0.5
    # ... and is large: the trained rule removes most of the loss an untrained one leaves
    assert after.mean() < before.mean() / 3 and after.mean() < start.mean() / 3


def test_validation_keeps_the_parameters_that_attacked_the_held_out_images_best(toy):
    model, x, y = toy
    xv, yv = _toy_images(model, 32, seed=3)
    learned = _fresh()
    history = meta_train(learned, model, x, y, stage="update", episodes=6, validate_every=2,
                         validation=(xv, yv), **META)
    measured = {h["episode"]: h["validation_loss"] for h in history if "validation_loss" in h}
    assert sorted(measured) == [0, 2, 4, 6]  # before training, then every 2 episodes
    kept = learned.settings["stages"]["update"]
    assert kept["validation_loss"] == min(measured.values())
    assert measured[kept["kept_episode"]] == kept["validation_loss"]
    # the optimizer now holds those parameters: the same attack gives the same loss again
    again = run_attack(model, xv, yv, eps=META["eps"], optimizer="zo_l2l", learned=learned,
                       num_pairs=META["num_pairs"],
                       max_queries=1 + META["iterations"] * (2 * META["num_pairs"] + 1))
    assert mean_loss_at_step(again, META["iterations"]) == kept["validation_loss"]


def test_a_query_stage_that_fails_leaves_the_stages_as_they_were(toy):
    model, x, y = toy
    learned = _fresh()
    meta_train(learned, model, x, y, stage="update", episodes=1, **META)
    broken = nn.Sequential(model, _Times(float("nan")))  # NaN logits: a NaN meta-loss
    with pytest.raises(ValueError, match="meta-loss became nan"):
        meta_train(learned, broken, x, y, stage="query", episodes=1, **META)
    assert learned.trained_stages == ["update"]
    assert all(p.requires_grad for p in model.parameters())


class _Times(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.factor


def test_each_stage_trains_only_its_own_rnn(toy):
    model, x, y = toy
    learned = _fresh()
    update0, query0 = _params(learned, "update"), _params(learned, "query")
    meta_train(learned, model, x, y, stage="update", episodes=2, **META)
    update1, query1 = _params(learned, "update"), _params(learned, "query")
    assert all(torch.equal(query0[k], query1[k]) for k in query0)
    assert all(not torch.equal(update0[k], update1[k]) for k in update0)
    assert learned.trained_stages == ["update"] and not learned.uses_query
    meta_train(learned, model, x, y, stage="query", episodes=2, **META)
    update2, query2 = _params(learned, "update"), _params(learned, "query")
    assert all(torch.equal(update1[k], update2[k]) for k in update1)
    assert all(not torch.equal(query1[k], query2[k]) for k in query1)
    assert learned.trained_stages == ["update", "query"] and learned.uses_query
    meta_train(learned, model, x, y, stage="update", episodes=1, **META)  # again: listed once
    assert learned.trained_stages == ["update", "query"]
    assert learned.settings["threat"] == "linf"
    assert learned.settings["stages"]["query"]["eps"] == META["eps"]
    assert set(learned.settings["stages"]) == {"update", "query"}
    assert all(p.requires_grad for p in learned.parameters())


def test_meta_training_leaves_the_model_as_it_found_it(toy):
    model, x, y = copy.deepcopy(toy[0]), toy[1], toy[2]
    model.bias.requires_grad_(False)  # mixed flags: each must come back as it was
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    meta_train(_fresh(), model, x, y, stage="update", episodes=1, **META)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.weight.requires_grad and not model.bias.requires_grad
    assert model.training


class _FailsAfter(nn.Module):
    """The toy model, raising on its ``calls``-th forward pass."""

    def __init__(self, net: nn.Module, calls: int) -> None:
        super().__init__()
        self.net, self.calls = net, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls == 0:
            raise RuntimeError("model failed")
        return self.net(x)


def test_meta_training_restores_the_model_when_it_fails(toy):
    model = _FailsAfter(copy.deepcopy(toy[0]), calls=30)
    model.net.bias.requires_grad_(False)
    model.train()
    learned = _fresh()
    with pytest.raises(RuntimeError, match="model failed"):
        meta_train(learned, model, toy[1], toy[2], stage="update", episodes=1, **META)
    assert model.net.weight.requires_grad and not model.net.bias.requires_grad and model.training
    assert all(p.requires_grad for p in learned.parameters())
    assert learned.trained_stages == []


@pytest.mark.parametrize("change, message", [
    ({"stage": "query"}, "the QueryRNN stage needs a trained UpdateRNN: run the 'update' stage "
                         "first"),
    ({"stage": "both"}, "stage must be one of update, query, got 'both'"),
    ({"iterations": 15}, r"iterations \(15\) must be a multiple of unroll \(10\)"),
    ({"threat": "l2", "settings": {"threat": "linf"}}, "meta-trained for linf, not l2"),
])
def test_bad_meta_training_settings_are_clear_errors(toy, change, message):
    model, x, y = toy
    learned = _fresh()
    learned.settings = change.get("settings", {})  # what it was meta-trained for before
    settings = {**META, "stage": "update", **{k: v for k, v in change.items() if k != "settings"}}
    before = copy.deepcopy(learned.state_dict())
    with pytest.raises(ValueError, match=message):
        meta_train(learned, model, x, y, **settings)
    assert all(torch.equal(before[k], v) for k, v in learned.state_dict().items())


# --- saving and loading ---------------------------------------------------------------------------


def test_saved_optimizer_loads_identical_and_attacks_identically(trained, tmp_path):
    learned, history = trained
    path = tmp_path / "l2l.pt"
    save_learned(learned, path, history)
    loaded, loaded_history = load_learned(path)
    assert loaded.state_dict().keys() == learned.state_dict().keys()
    assert all(torch.equal(v, learned.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.hidden_size == learned.hidden_size == 6
    assert loaded.query_penalty == learned.query_penalty
    assert loaded.trained_stages == learned.trained_stages == ["update", "query"]
    assert loaded.settings == learned.settings and loaded_history == history
    model = _toy_model()
    x, y = _toy_images(model, 32, seed=3)
    a, b = (run_attack(model, x, y, eps=0.05, optimizer="zo_l2l", learned=rule, num_pairs=5,
                       max_queries=200, seed=7) for rule in (learned, loaded))
    for field in ("success", "queries", "distortion", "loss_trace"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def _write_model_checkpoint(path, learned):
    _checkpoint(path, path.parent)


def _write_other_format(path, learned):
    save_learned(learned, path)
    saved = torch.load(path, weights_only=True)
    saved["robusttrain_learned_optimizer"] = FORMAT + 1
    torch.save(saved, path)


def _write_junk(path, learned):
    path.write_bytes(b"not a torch file")


@pytest.mark.parametrize("write, message", [
    (None, "not found; write one with `robusttrain meta-train --out"),
    (_write_model_checkpoint, r"is not a learned optimizer \(a model checkpoint\?"),
    (_write_other_format, f"has format {FORMAT + 1}, this version reads {FORMAT}; meta-train it"),
    (_write_junk, "is not a readable learned optimizer"),
], ids=["missing", "model-checkpoint", "other-format", "junk"])
def test_loading_what_is_not_a_learned_optimizer_is_a_clear_error(trained, tmp_path, write,
                                                                  message):
    path = tmp_path / "l2l.pt"
    if write is not None:
        write(path, trained[0])
    with pytest.raises(ValueError, match=message):
        load_learned(path)


# --- run_attack -----------------------------------------------------------------------------------


def test_learned_attack_counts_queries_like_the_other_optimizers(trained):
    # as test_attack's test of the hand-designed optimizers: margins 0.05 (broken at ε = 0.1) and
    # 0.3 (unbreakable)
    model = _Linear2(torch.ones(PIXELS) / PIXELS, 0.5)
    x = torch.full((6, PIXELS), 0.5)
    x[:3] += 0.05
    x[3:] += 0.3
    y = torch.zeros(6, dtype=torch.long)
    q, budget = 4, 300
    result = run_attack(model, x, y, eps=0.1, threat="linf", optimizer="zo_l2l",
                        learned=trained[0], num_pairs=q, sigma=0.01, max_queries=budget)
    assert result.success[:3].all() and not result.success[3:].any()
    assert (result.distortion <= 0.1 + 1e-6).all()
    per_step = 2 * q + 1
    steps = (budget - 1) // per_step
    assert (result.queries[3:] == 1 + steps * per_step).all()
    # a broken image paid its first check and 2q + 1 per step before its success
    assert ((result.queries - 1) % per_step == 0).all() and (result.queries <= budget).all()
    assert result.loss_trace.shape == (steps + 1, 6)
    torch.testing.assert_close(result.loss_trace[0], margin_loss(model(x), y))
    for i in range(3):  # from its success on, a broken image keeps its last loss (≤ 0)
        k = int(result.queries[i] - 1) // per_step
        assert (result.loss_trace[k:, i] == result.loss_trace[k, i]).all()
        assert result.loss_trace[k, i] <= 0 < result.loss_trace[0, i]
    assert result.settings["learned"] == trained[0].describe()


def test_run_attack_samples_with_the_query_rnn_once_it_is_trained():
    model = _toy_model()
    x, y = _toy_images(model, 16, seed=4)
    learned = _fresh()
    _randomize_queries(learned)
    learned.trained_stages = ["update"]
    update_only = run_attack(model, x, y, eps=0.05, optimizer="zo_l2l", learned=learned,
                             max_queries=200)
    learned.trained_stages = ["update", "query"]
    queried = run_attack(model, x, y, eps=0.05, optimizer="zo_l2l", learned=learned,
                         max_queries=200)
    assert not torch.equal(update_only.loss_trace, queried.loss_trace)


def test_run_attack_threads_the_learned_state_like_a_plain_loop():
    # run_attack keeps the memory per image (state.rows / state.put); while no image stops, its
    # trajectory is that of stepping all images together, as meta-training does
    model = _toy_model()
    x, y = _toy_images(model, 8, seed=4)
    learned = _fresh()
    _randomize_queries(learned)
    learned.trained_stages = ["update", "query"]
    q, steps, eps = 3, 5, 0.05
    result = run_attack(model, x, y, eps=eps, optimizer="zo_l2l", learned=learned, num_pairs=q,
                        max_queries=1 + steps * (2 * q + 1), seed=3)
    assert not result.success.any()  # small untrained steps: every image takes every step

    def losses(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return margin_loss(model(x[rows] + d), y[rows])

    rows = torch.arange(len(x))
    delta, state = torch.zeros_like(x), learned.initial_state(len(x), PIXELS)
    trace = [losses(delta, rows)]
    with torch.no_grad():
        for k in range(steps):
            moved, state, _ = learned.step(
                losses, delta, rows, state, num_pairs=q, sigma=0.001,
                unit=coordinate_scale(eps, "linf", PIXELS),
                generator=torch.Generator().manual_seed(pair_seed(3, k)), use_query=True)
            delta = project(moved, x, eps, "linf")
            trace.append(losses(delta, rows))
    torch.testing.assert_close(result.loss_trace, torch.stack(trace), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.distortion, delta.abs().amax(dim=1), rtol=0, atol=1e-7)


def test_coordinate_scale_is_eps_per_pixel_in_linf_and_spread_evenly_in_l2():
    assert coordinate_scale(0.1, "linf", 784) == 0.1
    assert coordinate_scale(2.0, "l2", 784) == pytest.approx(2.0 / 28)
    # a perturbation of that size on every coordinate lies on the sphere of radius ε
    unit = coordinate_scale(2.0, "l2", 784)
    assert torch.full((784,), unit).norm().item() == pytest.approx(2.0)


def test_a_learned_step_that_overshoots_is_projected_onto_the_l2_ball():
    model = _toy_model()
    x, y = _toy_images(model, 8, seed=6)
    learned = _fresh()
    with torch.no_grad():  # a rule that steps Δ = 3 on every coordinate: ‖unit·Δ‖ = 3ε
        learned.update_out.weight.zero_()
        learned.update_out.bias.fill_(3.0)
    eps = 0.05  # pixels in [0.3, 0.7] move by ε/√d = 0.0125: the pixel range does not bind
    result = run_attack(model, x, y, eps=eps, threat="l2", optimizer="zo_l2l", learned=learned,
                        num_pairs=2, max_queries=50)
    torch.testing.assert_close(result.distortion, torch.full((8,), eps))


@pytest.mark.parametrize("optimizer, give_learned, threat, message", [
    ("zo_l2l", False, "linf", "optimizer 'zo_l2l' needs a learned optimizer"),
    ("zo_adam", True, "linf", "and only it takes one"),
    ("zo_l2l", True, "l2", "meta-trained for the linf threat, not l2"),
])
def test_learned_attack_settings_are_checked(trained, optimizer, give_learned, threat, message):
    model = _Linear2(torch.ones(4) / 4, 0.5)
    x, y = torch.full((2, 4), 0.6), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        run_attack(model, x, y, eps=0.1, threat=threat, optimizer=optimizer,
                   learned=trained[0] if give_learned else None)


# --- the commands ---------------------------------------------------------------------------------


def _meta_train_args(ckpt, out, *extra: str) -> list[str]:
    # the tiny checkpoint classifies 4 of the first 48 training images right: batches of 2, and
    # 2 to validate
    return ["--ckpt", str(ckpt), "--images", "64", "--batch-size", "2", "--iterations", "4",
            "--unroll", "2", "--num-pairs", "2", "--validation-images", "2", "--out", str(out),
            *extra]


def test_meta_train_command_writes_the_optimizer_and_its_history_stage_by_stage(
        tmp_path, tiny_mnist, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    first, second = tmp_path / "update.pt", tmp_path / "both.pt"
    assert meta_train_command.main(_meta_train_args(ckpt, first, "--stages", "update",
                                                    "--episodes", "2")) == 0
    assert meta_train_command.main(_meta_train_args(ckpt, second, "--init", str(first),
                                                    "--stages", "query", "--episodes", "1")) == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads(second.with_suffix(".json").read_text())
    assert record["trained_stages"] == ["update", "query"]
    # each validated stage starts with its validation before training (episode 0)
    assert [(h["stage"], h["episode"]) for h in record["history"]] == [
        ("update", 0), ("update", 1), ("update", 2), ("query", 0), ("query", 1)]
    assert record["settings"]["stages"]["query"]["validation_images"] == 2
    assert record["settings"]["checkpoint"] == str(ckpt)
    assert record["settings"]["threat"] == "linf" and record["settings"]["images"] == 2
    learned, history = load_learned(second)
    assert history == record["history"] and learned.trained_stages == record["trained_stages"]
    assert learned.settings == record["settings"]
    updated, _ = load_learned(first)
    assert updated.trained_stages == ["update"]
    # the query stage of the second call left the UpdateRNN as the first call wrote it
    assert all(torch.equal(v, _params(learned, "update")[k])
               for k, v in _params(updated, "update").items())


def _pixels(ckpt, split: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The checkpoint's model on pixels in [0, 1] and the first ``n`` images of ``split``."""
    loaded, dm = checkpoints_and_data([str(ckpt)], None)
    dm.setup("fit" if split == "train" else "test")
    mean = torch.tensor(dm.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.spec.std).view(1, -1, 1, 1)
    images, labels = (dm.train_x, dm.train_y) if split == "train" else (dm.test_x, dm.test_y)
    model = PixelModel(loaded[0].backbone, dm.spec.mean, dm.spec.std)
    return model, images[:n] * std + mean, labels[:n]


def _rows_match(rows: list[dict], result) -> None:
    """The command's rows hold ``result``'s queries, successes and last losses, in order."""
    assert [int(r["queries"]) for r in rows] == result.queries.tolist()
    assert [int(r["success"]) for r in rows] == result.success.int().tolist()
    assert [float(r["loss_step200"]) for r in rows] == pytest.approx(
        result.loss_trace[-1].tolist(), rel=1e-6)


# κ = 100 in the commands below: the loss is the margin itself, so it tells images apart even
# where the tiny model already gets them wrong (most of them)


def test_attack_command_runs_a_learned_optimizer_beside_the_others(trained, tmp_path, tiny_mnist):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    rule = tmp_path / "l2l.pt"
    save_learned(trained[0], rule)  # coordinate-wise: trained on 16 pixels, runs on 784
    out = tmp_path / "out"
    assert attack_command.main(["--ckpt", str(ckpt), "--name", "tiny", "--images", "4",
                                "--max-queries", "100", "--optimizers", "zo_adam", "--learned",
                                f"l2l={rule}", "--kappa", "100", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "attack.csv").open()))
    assert [r["optimizer"] for r in rows] == ["zo_adam"] * 4 + ["l2l"] * 4
    model, x, y = _pixels(ckpt, "test", 4)
    _rows_match(rows[4:], run_attack(model, x, y, eps=0.2, optimizer="zo_l2l", learned=trained[0],
                                     max_queries=100, kappa=100))
    summary = json.loads((out / "attack.json").read_text())
    mine = summary["models"]["tiny"]["l2l"]
    assert mine["learned"] == trained[0].describe() and mine["file"] == str(rule)
    rate = sum(int(r["success"]) for r in rows[4:]) / 4
    assert mine["success_rate"] == pytest.approx(rate)
    assert summary["settings"]["learned"] == {"l2l": str(rule)}
    assert (out / "attack_loss.png").stat().st_size > 0 and (out / "attack.png").stat().st_size > 0


def test_attack_command_split_train_attacks_training_images(tmp_path, tiny_mnist):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    out = tmp_path / "out"
    assert attack_command.main(["--ckpt", str(ckpt), "--images", "4", "--max-queries", "50",
                                "--optimizers", "zo_sgd", "--kappa", "100", "--split", "train",
                                "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "attack.csv").open()))
    assert json.loads((out / "attack.json").read_text())["settings"]["split"] == "train"
    model, x, y = _pixels(ckpt, "train", 4)
    assert [int(r["label"]) for r in rows] == y.tolist()
    _rows_match(rows, run_attack(model, x, y, eps=0.2, optimizer="zo_sgd", max_queries=50,
                                 kappa=100, lr=attack_command.DEFAULT_LR["linf"]["zo_sgd"]))
    _, test_x, test_y = _pixels(ckpt, "test", 4)
    with torch.no_grad():  # and not the test images: their losses differ
        test_loss = margin_loss(model(test_x), test_y, kappa=100)
    assert [float(r["loss_step200"]) for r in rows] != pytest.approx(test_loss.tolist(), rel=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--stages", "foo"], "--stages must list some of update, query once each, got 'foo'"),
    (["--stages", "update,update"], "--stages must list some of update, query once each"),
    (["--stages", "query"], "run the 'update' stage first"),
    (["--batch-size", "8"], "training images are classified right, fewer than --batch-size 8 + "
                            "--validation-images 2; raise --images"),
    (["--init", "x.pt", "--hidden-size", "4"], "--hidden-size applies to a new optimizer"),
    (["--init", "missing.pt"], "learned optimizer missing.pt not found"),
])
def test_meta_train_command_bad_input_is_one_line(tmp_path, tiny_mnist, capsys, args, message):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    assert meta_train_command.main([*_meta_train_args(ckpt, tmp_path / "l2l.pt"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "l2l.pt").exists()


@pytest.mark.parametrize("learned, message", [
    ("nope", "--learned 'nope': expected NAME=PATH"),
    ("zo_adam={rule}", "--learned name 'zo_adam' is taken"),
    ("pgd={rule}", "--learned name 'pgd' is taken"),
    ("l2l={tmp}/missing.pt", "missing.pt not found"),
    ("l2l={rule} --threat l2", "was meta-trained for the linf threat; this attack is --threat l2"),
])
def test_attack_command_bad_learned_option_is_one_line(trained, tmp_path, tiny_mnist, capsys,
                                                       learned, message):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    rule = tmp_path / "l2l.pt"
    save_learned(trained[0], rule)
    value, *extra = learned.format(rule=rule, tmp=tmp_path).split()
    assert attack_command.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--learned",
                                value, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

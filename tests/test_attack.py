"""Black-box attacks: the margin loss, the projection, the input-gradient estimate (statistically),
exact query counting, success against a model with known geometry, and the command."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from robusttrain.commands.attack import main
from robusttrain.evaluation.attack import (
    margin_loss,
    project,
    run_attack,
    zo_input_gradient,
)
from robusttrain.models import MLP

pytestmark = pytest.mark.usefixtures("single_thread")


def test_margin_loss_untargeted_targeted_and_kappa():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 0])
    # untargeted: z_y − max other; clamped at −κ
    assert margin_loss(logits, labels, kappa=10).tolist() == [1.0, -3.0]
    assert margin_loss(logits, labels).tolist() == [1.0, 0.0]
    # targeted at class 2: max_{j≠2} z_j − z_2
    targets = torch.tensor([2, 2])
    assert margin_loss(logits, labels, targets, kappa=10).tolist() == [2.0, 2.0]


def test_projection_keeps_the_budget_and_the_pixel_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 4, 4, generator=g)
    delta = torch.randn(50, 1, 4, 4, generator=g)
    linf = project(delta, x, 0.1, "linf")
    assert linf.abs().max() <= 0.1 + 1e-7
    l2 = project(delta, x, 0.5, "l2")
    assert (l2.flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()
    for d in (linf, l2):
        assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
    small = 1e-3 * delta
    torch.testing.assert_close(project(small, torch.full_like(x, 0.5), 0.5, "l2"), small)


def test_input_gradient_estimate_is_unbiased_with_the_predicted_variance():
    # ℓ_b(δ) = a·δ for every image: ĝ_b = (1/q) Σ (a·u_i) u_i, mean a, E‖ĝ_b − a‖² = (d+1)|a|²/q
    d, q, images = 20, 5, 4000
    a = torch.linspace(-1, 1, d)
    delta = torch.zeros(images, d)
    rows = torch.arange(images)
    g = zo_input_gradient(lambda dd, rr: dd @ a, delta, rows, num_pairs=q, sigma=0.1,
                          generator=torch.Generator().manual_seed(3))
    # each coordinate of the mean over images: within 5 standard errors √((|a|² + a_j²)/(q·B))
    se = ((a.pow(2).sum() + a.pow(2)) / (q * images)).sqrt()
    assert ((g.mean(dim=0) - a).abs() <= 5 * se).all()
    err = (g - a).pow(2).sum(dim=1) / ((d + 1) * a.pow(2).sum() / q)
    assert abs(err.mean().item() - 1) < 5 * err.std().item() / images ** 0.5


class _Linear2(nn.Module):
    """Two classes, logits (w·x − c, c − w·x): class 0 iff w·x > c."""

    def __init__(self, w: torch.Tensor, c: float) -> None:
        super().__init__()
        self.w, self.c = w, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w - self.c
        return torch.stack([s, -s], dim=1)


@pytest.mark.parametrize("optimizer", ["zo_sgd", "zo_signsgd", "zo_adam", "nes", "pgd"])
def test_attacks_break_what_the_budget_allows_and_count_queries_exactly(optimizer):
    d = 16
    w = torch.ones(d) / d  # w·x = mean pixel; class 0 iff mean pixel > 0.5
    model = _Linear2(w, 0.5)
    x = torch.full((6, d), 0.5)
    x[:3] += 0.05  # margin 0.05 in L∞: broken by ε = 0.1
    x[3:] += 0.3   # margin 0.3: unbreakable at ε = 0.1
    y = torch.zeros(6, dtype=torch.long)
    lr = {"zo_sgd": 1.0}.get(optimizer, 0.02)
    q, budget = 4, 300
    result = run_attack(model, x, y, eps=0.1, threat="linf", optimizer=optimizer, num_pairs=q,
                        sigma=0.01, lr=lr, max_queries=budget)
    assert result.success[:3].all() and not result.success[3:].any()
    assert (result.distortion <= 0.1 + 1e-6).all()
    # the unbroken images spent the whole budget in whole steps: 1 check + s·(2q + 1)
    per_step = 1 if optimizer == "pgd" else 2 * q + 1
    steps = (budget - 1) // per_step
    assert (result.queries[3:] == 1 + steps * per_step).all()
    assert (result.queries[:3] <= budget).all()


def test_an_image_already_misclassified_costs_one_query():
    model = _Linear2(torch.ones(4) / 4, 0.5)
    x = torch.full((2, 4), 0.2)  # class 1 already
    result = run_attack(model, x, torch.zeros(2, dtype=torch.long), eps=0.1, optimizer="zo_adam")
    assert result.success.all() and result.queries.tolist() == [1, 1]


def test_bad_attack_settings_are_clear_errors():
    model = _Linear2(torch.ones(4) / 4, 0.5)
    x, y = torch.full((2, 4), 0.6), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="threat must be one of linf, l2"):
        run_attack(model, x, y, eps=0.1, threat="l3")
    with pytest.raises(ValueError, match="eps must be a positive number"):
        run_attack(model, x, y, eps=0)
    with pytest.raises(ValueError, match="target class equals the true class"):
        run_attack(model, x, y, eps=0.1, targets=y)


def _checkpoint(path, data_dir):
    torch.manual_seed(0)
    backbone = MLP(784, [16], 10)
    torch.save({
        "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
        "robusttrain": {"format": 1, "backbone": backbone.spec, "method": "sgd"},
        "datamodule_hyper_parameters": {"dataset": "mnist", "data_dir": str(data_dir),
                                        "val_size": 16, "split_seed": 0},
    }, path)
    return path


def test_attack_command_writes_rows_summary_and_plot(tmp_path, tiny_mnist, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    out = tmp_path / "out"
    code = main(["--ckpt", str(ckpt), "--name", "tiny", "--images", "8", "--max-queries", "200",
                 "--optimizers", "zo_adam,pgd", "--eps", "0.3", "--targeted", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "attack.csv").open()))
    assert len(rows) == 8 * 2
    assert all(r["target"] != r["label"] for r in rows)
    summary = json.loads((out / "attack.json").read_text())
    for optimizer in ("zo_adam", "pgd"):
        mine = [r for r in rows if r["optimizer"] == optimizer]
        rate = sum(int(r["success"]) for r in mine) / len(mine)
        assert summary["models"]["tiny"][optimizer]["success_rate"] == pytest.approx(rate)
        assert all(int(r["queries"]) <= 200 for r in mine)
    assert (out / "attack.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "zo_adam,zoo"], "--optimizers: unknown ['zoo']"),
    (["--threat", "l3"], "--threat must be one of linf, l2"),
    (["--lr", "adam=0.1"], "--lr names 'adam'"),
])
def test_attack_command_bad_options(tmp_path, tiny_mnist, capsys, args, message):
    ckpt = _checkpoint(tmp_path / "m.ckpt", tiny_mnist)
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err

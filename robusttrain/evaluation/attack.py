r"""Black-box adversarial examples from a model's outputs only, with white-box PGD as the reference.

The attacker sees the model as a function from images to logits and counts every image it sends.
It looks for δ with ‖δ‖ ≤ ε (L∞ or L2, in pixel units of [0, 1]) and x + δ ∈ [0, 1] that makes the
model misclassify x (untargeted) or say a chosen class t (targeted), by minimizing the margin loss
of Carlini & Wagner (2017),

    untargeted: ℓ(δ) = max(z_y − max_{j≠y} z_j, −κ),   targeted: ℓ(δ) = max(max_{j≠t} z_j − z_t, −κ),

with z the logits at x + δ; ℓ < 0 exactly when the attack has succeeded (up to ties). The gradient
of ℓ in δ is estimated per image from antithetic pairs of queries, the estimator of the weights
(:mod:`robusttrain.zo.estimators`) applied to the input,

    ĝ = 1/(2σq) Σ_{i=1..q} [ℓ(δ + σu_i) − ℓ(δ − σu_i)] u_i,   u_i ~ N(0, I),

(2q queries per image and step, plus one query to check the current δ), and the step is taken by one
of the zeroth-order optimizers of the black-box attack literature, then projected back onto the
threat set:

* ``zo_sgd``: δ ← Π(δ − lr·ĝ) (Ghadimi & Lan 2013; the ZOO attack's plain variant, Chen et al. 2017);
* ``zo_signsgd``: δ ← Π(δ − lr·sign ĝ) (Liu et al. 2019);
* ``zo_adam``: Adam's moments on ĝ (Chen et al. 2017, ZOO-Adam);
* ``nes``: the projected-gradient step of the threat model on the NES estimate (Ilyas et al. 2018):
  lr·sign ĝ for L∞ (the same step as ``zo_signsgd`` there), lr·ĝ/‖ĝ‖₂ for L2;
* ``zo_l2l``: a learned optimizer (:mod:`robusttrain.evaluation.zo_l2l`, Ruan et al. 2020): an LSTM
  turns ĝ into the step and a second one chooses the per-coordinate scale of the directions;
* ``pgd``: the same step with the true gradient by autograd (Madry et al. 2018) — white box, the
  reference; its "queries" are forward-backward passes.

An image stops being attacked (and queried) once it is misclassified; an image the model already
gets wrong counts as a success at 0 queries. Everything is seeded: the directions of step k come
from a generator seeded with ``pair_seed(seed, k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.noise.seeds import pair_seed

__all__ = ["LEARNED", "LOSS_STEPS", "OPTIMIZERS", "THREATS", "AttackResult", "LearnedOptimizer",
           "PixelModel", "coordinate_scale", "margin_loss", "mean_loss_at_step", "project",
           "run_attack", "success_curve", "summarize_attack", "zo_input_gradient"]

THREATS = ("linf", "l2")
OPTIMIZERS = ("zo_sgd", "zo_signsgd", "zo_adam", "nes", "pgd")  # hand-designed, and the reference
LEARNED = "zo_l2l"  # run_attack's name for a learned optimizer (give it as ``learned``)


class LearnedOptimizer(Protocol):
    """What :func:`run_attack` needs of a learned optimizer (:class:`~robusttrain.evaluation.zo_l2l.
    LearnedZOOptimizer`): per-image memory, one step, and what it was trained for."""

    settings: dict[str, Any]

    @property
    def uses_query(self) -> bool: ...

    def initial_state(self, images: int, dims: int, device: Any = "cpu") -> Any: ...

    def step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             delta: torch.Tensor, rows: torch.Tensor, state: Any, *, num_pairs: int, sigma: float,
             unit: float, generator: torch.Generator, use_query: bool) -> tuple[Any, Any, Any]: ...

    def describe(self) -> str: ...


def coordinate_scale(eps: float, threat: str, dims: int) -> float:
    """The size of one coordinate of the threat set: ε for L∞, ε/√d for L2 (ε spread evenly)."""
    return eps if threat == "linf" else eps / math.sqrt(dims)


def margin_loss(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None,
    kappa: float = 0.0,
) -> torch.Tensor:
    """The C&W margin loss per row (see the module docstring); negative means success.

    Args:
        logits: (B, C).
        labels: (B,) true classes.
        targets: (B,) target classes for a targeted attack, ``None`` for untargeted.
        kappa: confidence: the loss is clamped below at −κ.
    """
    ref = labels if targets is None else targets
    mask = F.one_hot(ref, logits.shape[1]).bool()
    ref_logit = logits[mask]
    best_other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    margin = ref_logit - best_other if targets is None else best_other - ref_logit
    return margin.clamp_min(-kappa)


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, threat: str) -> torch.Tensor:
    """δ projected onto {‖δ‖ ≤ ε} (L∞: clamp; L2: rescale each row) and onto x + δ ∈ [0, 1]."""
    if threat == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        delta = delta * scale
    return (x + delta).clamp(0.0, 1.0) - x


def zo_input_gradient(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], delta: torch.Tensor,
    rows: torch.Tensor, *, num_pairs: int, sigma: float, generator: torch.Generator,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The antithetic estimate ĝ of ∇_δ ℓ for every image at once (2·num_pairs queries each).

    With ``scale`` s the directions are u_i = s ⊙ g_i and ĝ is unbiased for S²∇ℓ_S, the gradient
    of the loss smoothed with N(0, σ²S²), preconditioned by S² (:mod:`robusttrain.evaluation.zo_l2l`).

    Args:
        loss_fn: ``loss_fn(delta_batch, rows_batch)`` -> per-row losses; ``rows_batch`` says which
            image each row of ``delta_batch`` belongs to.
        delta: (B, ...) the current perturbations.
        rows: (B,) the image index of each row of ``delta``.
        num_pairs: q.
        sigma: σ, in pixel units.
        generator: draws the directions u_i (B·q standard normal images).
        scale: (B, ...) per-coordinate scales s of the directions, or ``None`` (s = 1).
    """
    u = torch.randn((num_pairs, *delta.shape), generator=generator, device=delta.device)
    if scale is not None:
        u = u * scale
    moved = torch.cat([delta.unsqueeze(0) + sigma * u, delta.unsqueeze(0) - sigma * u])
    losses = loss_fn(moved.flatten(0, 1), rows.repeat(2 * num_pairs)).view(2, num_pairs, -1)
    diff = (losses[0] - losses[1]).view(num_pairs, -1, *([1] * (delta.dim() - 1)))
    return (diff * u).sum(dim=0) / (2 * sigma * num_pairs)


@dataclass
class AttackResult:
    """Per image: success, queries used until success (or in all), final distortion; and curves."""

    success: torch.Tensor  # (B,) bool
    queries: torch.Tensor  # (B,) long: queries at success, or all spent
    distortion: torch.Tensor  # (B,) ‖δ‖ in the threat model's norm
    curve: list[dict[str, float]] = field(default_factory=list)  # per step: queries, mean loss
    # (steps + 1, B): attack loss of each image at the check of each step; an image that stopped
    # (broken or out of budget) keeps its last value
    loss_trace: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    settings: dict[str, Any] = field(default_factory=dict)


def run_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, threat: str = "linf",
    optimizer: str = "zo_adam", targets: torch.Tensor | None = None, max_queries: int = 10_000,
    num_pairs: int = 10, sigma: float = 0.001, lr: float = 0.01, kappa: float = 0.0,
    seed: int = 0, batch_size: int = 4096, learned: LearnedOptimizer | None = None,
) -> AttackResult:
    """Attack every image of ``x`` (pixels in [0, 1]) on ``model`` (which takes such pixels).

    Args:
        model: maps (B, ...) images in [0, 1] to logits; evaluated in eval mode, not changed.
        x, y: images and their true labels.
        eps: the budget ε in pixel units.
        threat: ``"linf"`` or ``"l2"``.
        optimizer: one of :data:`OPTIMIZERS`, or :data:`LEARNED` with ``learned``.
        targets: target classes (targeted attack), or ``None``.
        max_queries: budget of model queries per image (``pgd``: forward-backward passes).
        num_pairs: antithetic pairs q per step (zeroth-order optimizers).
        sigma: smoothing σ of the estimate, in pixel units.
        lr: step size (Adam's for ``zo_adam``).
        kappa: margin confidence κ.
        seed: base seed of the directions.
        batch_size: images per forward pass.
        learned: the learned optimizer ``zo_l2l`` runs (its ``lr`` is ignored: it learned steps
            in units of the threat set).

    Raises:
        ValueError: a bad setting; the message names it.
    """
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {', '.join(THREATS)}, got {threat!r}")
    if optimizer not in (*OPTIMIZERS, LEARNED):
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} or {LEARNED}, got "
                         f"{optimizer!r}")
    if (optimizer == LEARNED) != (learned is not None):
        raise ValueError(f"optimizer {LEARNED!r} needs a learned optimizer (learned=...), and "
                         "only it takes one")
    if learned is not None and learned.settings.get("threat") not in (None, threat):
        raise ValueError(f"the learned optimizer was meta-trained for the "
                         f"{learned.settings['threat']} threat, not {threat}")
    for name, value in (("eps", eps), ("sigma", sigma), ("lr", lr)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(num_pairs, int) and num_pairs >= 1):
        raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}")
    if not (isinstance(max_queries, int) and max_queries >= 1):
        raise ValueError(f"max_queries must be an integer >= 1, got {max_queries!r}")
    if targets is not None and bool((targets == y).any()):
        raise ValueError("a target class equals the true class of its image; choose another")
    was_training = model.training
    model.eval()
    try:
        return _attack(model, x, y, eps, threat, optimizer, targets, max_queries, num_pairs,
                       sigma, lr, kappa, seed, batch_size, learned)
    finally:
        model.train(was_training)


def _attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, threat: str, optimizer: str,
    targets: torch.Tensor | None, max_queries: int, num_pairs: int, sigma: float, lr: float,
    kappa: float, seed: int, batch_size: int, learned: LearnedOptimizer | None,
) -> AttackResult:
    n = x.shape[0]
    current_loss = torch.zeros(n)
    trace = []
    if learned is not None:
        state = learned.initial_state(n, x[0].numel(), device=x.device)
        unit = coordinate_scale(eps, threat, x[0].numel())
    delta = torch.zeros_like(x)
    queries = torch.zeros(n, dtype=torch.long)
    success = torch.zeros(n, dtype=torch.bool)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    done = torch.zeros(n, dtype=torch.bool)  # out of budget: its last δ has been checked
    per_step = 1 if optimizer == "pgd" else 2 * num_pairs + 1  # a step and the check after it
    curve = []

    def logits_of(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x[rows[s:s + batch_size]] + d[s:s + batch_size])
                          for s in range(0, d.shape[0], batch_size)])

    def losses(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return margin_loss(logits_of(d, rows), y[rows], None if targets is None else targets[rows],
                           kappa)

    step = 0
    while True:
        active = (~success & ~done).nonzero().flatten()
        if active.numel() == 0:
            break
        d = delta[active].clone().requires_grad_(optimizer == "pgd")
        with torch.set_grad_enabled(optimizer == "pgd"):
            logits = logits_of(d, active)  # the check of the current δ: one query per image
            loss = margin_loss(logits, y[active], None if targets is None else targets[active],
                               kappa)
        queries[active] += 1
        current_loss[active] = loss.detach().to(current_loss.device)
        trace.append(current_loss.clone())
        predicted = logits.detach().argmax(dim=1)
        wrong = predicted != y[active] if targets is None else predicted == targets[active]
        success[active[wrong]] = True
        curve.append({"step": step, "mean_queries": float(queries[active].float().mean()),
                      "mean_loss": float(loss.detach().mean()),
                      "success_rate": float(success.float().mean())})
        keep = ~wrong & (queries[active] + per_step <= max_queries)
        done[active[~wrong & ~keep]] = True
        if not bool(keep.any()):
            break
        if optimizer == "pgd":
            g = torch.autograd.grad(loss.sum(), d)[0][keep]
        active, d = active[keep], d.detach()[keep]
        if learned is not None:
            generator = torch.Generator(device=x.device).manual_seed(pair_seed(seed, step))
            with torch.no_grad():
                moved, mine, _ = learned.step(losses, d, active, state.rows(active),
                                              num_pairs=num_pairs, sigma=sigma, unit=unit,
                                              generator=generator, use_query=learned.uses_query)
            state.put(active, mine)
            queries[active] += 2 * num_pairs
            delta[active] = project(moved, x[active], eps, threat)
            step += 1
            continue
        if optimizer != "pgd":
            generator = torch.Generator(device=x.device).manual_seed(pair_seed(seed, step))
            with torch.no_grad():
                g = zo_input_gradient(losses, d, active, num_pairs=num_pairs, sigma=sigma,
                                      generator=generator)
            queries[active] += 2 * num_pairs
        delta[active] = project(d - _step(optimizer, threat, g, lr, m, v, active, step), x[active],
                                eps, threat)
        step += 1
    norms = (delta.flatten(1).abs().amax(dim=1) if threat == "linf"
             else delta.flatten(1).norm(dim=1))
    return AttackResult(success=success, queries=queries, distortion=norms, curve=curve,
                        loss_trace=torch.stack(trace), settings={
        "eps": eps, "threat": threat, "optimizer": optimizer, "targeted": targets is not None,
        "max_queries": max_queries, "num_pairs": num_pairs, "sigma": sigma, "lr": lr,
        "kappa": kappa, "seed": seed, "images": n,
        **({"learned": learned.describe()} if learned is not None else {})})


def _step(optimizer: str, threat: str, g: torch.Tensor, lr: float, m: torch.Tensor,
          v: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
    """The change −Δδ of one step of ``optimizer`` (Adam moments in ``m``, ``v`` at ``rows``)."""
    if optimizer == "zo_sgd":
        return lr * g
    if optimizer == "zo_signsgd" or (threat == "linf" and optimizer in ("nes", "pgd")):
        return lr * g.sign()
    if optimizer in ("nes", "pgd"):  # L2: normalized gradient step
        norms = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        return lr * g / norms
    # zo_adam (β1 0.9, β2 0.999), bias-corrected with the image's own step count
    m[rows] = 0.9 * m[rows] + 0.1 * g
    v[rows] = 0.999 * v[rows] + 0.001 * g * g
    t = step + 1
    return lr * (m[rows] / (1 - 0.9 ** t)) / ((v[rows] / (1 - 0.999 ** t)).sqrt() + 1e-8)


class PixelModel(nn.Module):
    """A network trained on normalized inputs, fed pixels in [0, 1]: ``net((u − mean) / std)``."""

    mean: torch.Tensor  # buffers, (1, C, 1, 1)
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net((u - self.mean) / self.std)


def success_curve(result: AttackResult, budgets: list[int]) -> list[float]:
    """Fraction of images broken within each query budget."""
    return [float((result.success & (result.queries <= b)).float().mean()) for b in budgets]


def summarize_attack(result: AttackResult) -> dict[str, Any]:
    """Success rates, queries and distortion over the images the attack had to break.

    ``success_rate`` counts every image (one the model already gets wrong is a success at its
    first query); ``success_rate_on_correct``, ``median_queries``, ``mean_queries`` and
    ``mean_distortion`` count only the images the model classified correctly (``correct``);
    ``mean_loss_at_step`` is the attack loss over all images after 0, 10, ... steps.
    """
    already = result.success & (result.queries <= 1)
    broken = result.success & ~already
    correct = int((~already).sum())
    return {
        "success_rate": float(result.success.float().mean()),
        "already_wrong": int(already.sum()),
        "correct": correct,
        "success_rate_on_correct": float(broken.sum()) / correct if correct else None,
        "median_queries": float(result.queries[broken].float().median()) if broken.any() else None,
        "mean_queries": float(result.queries[broken].float().mean()) if broken.any() else None,
        "mean_distortion": float(result.distortion[broken].mean()) if broken.any() else None,
        "mean_loss_at_step": {str(k): mean_loss_at_step(result, k) for k in LOSS_STEPS},
    }


LOSS_STEPS = (0, 10, 50, 100, 200, 400)


def mean_loss_at_step(result: AttackResult, step: int) -> float:
    """Mean attack loss over all images after ``step`` steps (a stopped image keeps its last)."""
    trace = result.loss_trace
    return float(trace[min(step, trace.shape[0] - 1)].mean())

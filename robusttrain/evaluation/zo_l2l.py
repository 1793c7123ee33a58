r"""A learned zeroth-order optimizer for black-box attacks: ZO-L2L (Ruan et al., ICLR 2020).

Hand-designed zeroth-order optimizers (:mod:`robusttrain.evaluation.attack`) turn the estimate ĝ of
the attack loss's gradient into a step by a fixed rule (δ − lr·ĝ, lr·sign ĝ, Adam). ZO-L2L learns the
rule, and learns where to query:

* **UpdateRNN** — one LSTM cell (``hidden_size`` units) shared by every coordinate j of every image,
  the coordinate-wise optimizer of Andrychowicz et al. (2016). Per step it reads, per coordinate,
  ĝ_j/rms(ĝ) (the estimate divided by its root mean square over the image's coordinates, so that
  the scale of the model's logits does not matter) and δ_j/unit (where the coordinate sits in the
  threat set) and outputs the step Δ_j in units of ``unit`` = ε (L∞) or ε/√d (L2: the size of one
  coordinate of a perturbation spread evenly on the sphere). Then δ ← Π(δ + unit·Δ) (projection onto
  the threat set and the pixel range). The paper feeds ĝ only; δ tells the rule that the
  projection is about to clip it.
* **QueryRNN** — a second LSTM cell reading, per coordinate, the previous step's ĝ_j/rms(ĝ) and
  Δ_j, and giving a sampling scale s_j = 1 + o_j, rescaled so that ‖s‖₂ = √d (the same total query
  variance as standard normal directions, as in the reference code). The directions become
  u_i = s ⊙ g_i, g_i ~ N(0, I), and the antithetic estimate is

      ĝ = 1/(2σq) Σ_i [ℓ(δ + σu_i) − ℓ(δ − σu_i)] u_i,

  which is **unbiased for S²∇ℓ_S(δ)**, S = diag(s), ℓ_S(δ) = E_g ℓ(δ + σ S g) its own (anisotropic)
  smoothing (Stein's identity with covariance σ²S²): the learned sampling keeps the estimate
  unbiased for the gradient of its own smoothing *preconditioned by S²*, not for ∇ℓ_S itself unless
  S = I. S⁻²ĝ would be unbiased for ∇ℓ_S but its variance grows as 1/s_j² where the QueryRNN
  queries little; the UpdateRNN learns to use the preconditioned estimate, as in the paper.
  A penalty λ·mean(o²) (λ = ``query_penalty``) keeps s near 1 where it does not help.

Meta-training (:func:`meta_train`) runs attacks on training images of a model the attacker owns and
minimizes the mean attack loss along the trajectory, in truncated unrolls (``unroll`` steps each,
the state carried over and cut from the graph between them), in the paper's two stages: first
the UpdateRNN with standard normal directions, then the QueryRNN with the UpdateRNN frozen; with
held-out validation images each stage keeps the parameters that attack them best (measured before
training too, so a QueryRNN that does not help stays at s = 1). As in the reference
implementation's default, the meta-gradient is *first order*: the loss at δ_{t+1} is differentiated
through the model (white box at meta-training time, never at attack time) and back along
δ_{t+1} = Π(δ_t + unit·Δ_t); ĝ and δ/unit are treated as inputs of the UpdateRNN (their dependence
on δ dropped, as Andrychowicz et al. drop second derivatives), and in the QueryRNN stage the
gradient flows into s through the directions u_i = s ⊙ g_i of the queries. At attack time the
optimizer sees outputs only, and every query is counted like the hand-designed optimizers' queries.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robusttrain.evaluation.attack import (
    LEARNED,
    THREATS,
    coordinate_scale,
    margin_loss,
    mean_loss_at_step,
    project,
    run_attack,
    zo_input_gradient,
)
from robusttrain.files import write_atomic
from robusttrain.noise.seeds import pair_seed

__all__ = ["STAGES", "LearnedState", "LearnedZOOptimizer", "load_learned", "meta_train",
           "save_learned"]

FORMAT = 1  # of the saved file; bumped when the parameters change meaning
STAGES = ("update", "query")


def _normalized(g: torch.Tensor) -> torch.Tensor:
    """g / rms(g) per row ((b, d)); a zero row stays zero (and has a finite gradient)."""
    return g / (g.pow(2).mean(dim=1, keepdim=True) + 1e-24).sqrt()


@dataclass
class LearnedState:
    """The optimizer's memory for a set of images: LSTM states (b, d, H) and the last ĝ and Δ (b, d)."""

    update_h: torch.Tensor
    update_c: torch.Tensor
    query_h: torch.Tensor
    query_c: torch.Tensor
    last_g: torch.Tensor
    last_step: torch.Tensor

    def rows(self, rows: torch.Tensor) -> LearnedState:
        """The state of the images ``rows``."""
        return LearnedState(*(t[rows] for t in self._tensors()))

    def put(self, rows: torch.Tensor, other: LearnedState) -> None:
        """Write ``other`` (the state of ``rows``) back in place."""
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine[rows] = theirs

    def detached(self) -> LearnedState:
        """The same values cut from the autograd graph (between truncated unrolls)."""
        return LearnedState(*(t.detach() for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.update_h, self.update_c, self.query_h, self.query_c, self.last_g,
                self.last_step)


class LearnedZOOptimizer(nn.Module):
    """UpdateRNN and QueryRNN (see the module docstring); coordinate-wise, any image size.

    Args:
        hidden_size: LSTM units of each RNN (the paper: 10).
        query_penalty: λ of the penalty λ·mean(o²) on the QueryRNN's output.
    """

    def __init__(self, hidden_size: int = 10, query_penalty: float = 0.005) -> None:
        super().__init__()
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.query_penalty = query_penalty
        self.update_rnn = nn.LSTMCell(2, hidden_size)
        self.update_out = nn.Linear(hidden_size, 1)
        self.query_rnn = nn.LSTMCell(2, hidden_size)
        self.query_out = nn.Linear(hidden_size, 1)
        with torch.no_grad():  # small first steps; s = 1 (standard directions) before training
            self.update_out.weight.mul_(0.1)
            self.update_out.bias.zero_()
            self.query_out.weight.zero_()
            self.query_out.bias.zero_()
        self.trained_stages: list[str] = []  # filled by meta_train; saved with the weights
        self.settings: dict[str, Any] = {}   # threat, eps, ... it was meta-trained for

    @property
    def uses_query(self) -> bool:
        """Whether the QueryRNN has been trained (otherwise directions are standard normal)."""
        return "query" in self.trained_stages

    def initial_state(self, images: int, dims: int, device: torch.device | str = "cpu"
                      ) -> LearnedState:
        """Zero memory for ``images`` images of ``dims`` coordinates."""
        hidden = torch.zeros(images, dims, self.hidden_size, device=device)
        flat = torch.zeros(images, dims, device=device)
        return LearnedState(hidden, hidden.clone(), hidden.clone(), hidden.clone(), flat,
                            flat.clone())

    def sampling_scale(self, state: LearnedState) -> tuple[torch.Tensor, torch.Tensor,
                                                           LearnedState]:
        """The QueryRNN: per-coordinate scales s (b, d) with ‖s_b‖ = √d, the penalty, new state."""
        b, d = state.last_g.shape
        inputs = torch.stack([_normalized(state.last_g), state.last_step], dim=2).view(b * d, 2)
        h, c = self.query_rnn(inputs, (state.query_h.view(b * d, -1),
                                       state.query_c.view(b * d, -1)))
        o = self.query_out(h).view(b, d)
        s = (1.0 + o).abs()
        s = s * math.sqrt(d) / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        penalty = self.query_penalty * o.pow(2).mean()
        new = LearnedState(state.update_h, state.update_c, h.view(b, d, -1), c.view(b, d, -1),
                           state.last_g, state.last_step)
        return s, penalty, new

    def update(self, g: torch.Tensor, position: torch.Tensor, state: LearnedState
               ) -> tuple[torch.Tensor, LearnedState]:
        """The UpdateRNN: the step Δ (b, d) in units of the threat set, and the new state.

        Args:
            g: (b, d) the gradient estimate ĝ.
            position: (b, d) δ / unit.
            state: the memory of these b images.
        """
        b, d = g.shape
        inputs = torch.stack([_normalized(g), position], dim=2).view(b * d, 2)
        h, c = self.update_rnn(inputs, (state.update_h.view(b * d, -1),
                                        state.update_c.view(b * d, -1)))
        step = self.update_out(h).view(b, d)
        new = LearnedState(h.view(b, d, -1), c.view(b, d, -1), state.query_h, state.query_c,
                           g, step)
        return step, new

    def step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             delta: torch.Tensor, rows: torch.Tensor, state: LearnedState, *, num_pairs: int,
             sigma: float, unit: float, generator: torch.Generator, use_query: bool,
             ) -> tuple[torch.Tensor, LearnedState, torch.Tensor]:
        """One step of the learned optimizer: sample, estimate, update (before the projection).

        Args:
            loss_fn: ``loss_fn(delta_batch, rows_batch)`` -> per-row attack losses (the queries).
            delta: (b, ...) current perturbations (queried as constants: no gradient into δ).
            rows: (b,) image index of each row.
            state: the memory of these rows.
            num_pairs, sigma: q and σ of the estimate.
            unit: :func:`~robusttrain.evaluation.attack.coordinate_scale`.
            generator: draws the directions.
            use_query: sample with the QueryRNN's scales (else standard normal directions).

        Returns:
            (the unprojected new δ, the new state, the QueryRNN penalty (0 without it)).
        """
        b = delta.shape[0]
        flat = delta.detach().flatten(1)
        penalty = delta.new_zeros(())
        scale = None
        if use_query:
            s, penalty, state = self.sampling_scale(state)
            scale = s.view_as(delta)
        g = zo_input_gradient(loss_fn, delta.detach(), rows, num_pairs=num_pairs, sigma=sigma,
                              generator=generator, scale=scale)
        step, state = self.update(g.reshape(b, -1), flat / unit, state)
        return delta + unit * step.view_as(delta), state, penalty

    def describe(self) -> str:
        stages = " + ".join(self.trained_stages) or "untrained"
        return f"ZO-L2L (hidden {self.hidden_size}; meta-trained: {stages})"


def save_learned(learned: LearnedZOOptimizer, path: str | Path,
                 history: list[dict[str, Any]] | None = None) -> None:
    """Write the optimizer, its stages, settings and meta-training history to ``path`` (whole)."""
    buf = io.BytesIO()
    torch.save({"robusttrain_learned_optimizer": FORMAT,
                "hidden_size": learned.hidden_size, "query_penalty": learned.query_penalty,
                "state_dict": learned.state_dict(), "trained_stages": list(learned.trained_stages),
                "settings": dict(learned.settings), "history": list(history or [])}, buf)
    write_atomic(path, buf.getvalue())


def load_learned(path: str | Path) -> tuple[LearnedZOOptimizer, list[dict[str, Any]]]:
    """The optimizer saved at ``path`` and its meta-training history.

    Raises:
        ValueError: a missing file, or a file that is not a learned optimizer of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"learned optimizer {path} not found; write one with "
                         f"`robusttrain meta-train --out {path}`")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a readable learned optimizer ({err})") from None
    if not isinstance(saved, dict) or "robusttrain_learned_optimizer" not in saved:
        raise ValueError(f"{path} is not a learned optimizer (a model checkpoint? give the file "
                         "`robusttrain meta-train` wrote)")
    if saved["robusttrain_learned_optimizer"] != FORMAT:
        raise ValueError(f"{path} has format {saved['robusttrain_learned_optimizer']}, this "
                         f"version reads {FORMAT}; meta-train it again")
    missing = [k for k in ("hidden_size", "query_penalty", "state_dict", "trained_stages",
                           "settings", "history") if k not in saved]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: a damaged learned optimizer; "
                         "meta-train it again")
    learned = LearnedZOOptimizer(saved["hidden_size"], saved["query_penalty"])
    learned.load_state_dict(saved["state_dict"])
    learned.trained_stages = list(saved["trained_stages"])
    learned.settings = dict(saved["settings"])
    return learned, list(saved["history"])


def meta_train(
    learned: LearnedZOOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
    stage: str, eps: float, threat: str = "linf", num_pairs: int = 10, sigma: float = 0.001,
    iterations: int = 200, unroll: int = 20, episodes: int = 60, batch_size: int = 32,
    lr: float = 0.005, kappa: float = 0.0, seed: int = 0,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None, validate_every: int = 5,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Meta-train one stage of ``learned`` on attacks against ``model`` on images ``x``.

    Each episode attacks ``batch_size`` images drawn from ``x`` (seeded) for ``iterations`` steps
    from δ = 0, cut into truncated unrolls of ``unroll`` steps; after each unroll the mean attack
    loss over its steps (plus the QueryRNN penalty) is back-propagated and Adam steps the stage's
    parameters (the other RNN is frozen).

    With ``validation`` images, the stage keeps the parameters that attack them best: the mean
    attack loss after ``iterations`` steps of the real attack (:func:`~robusttrain.evaluation.
    attack.run_attack`, fixed seed) is measured before the first episode and every
    ``validate_every`` episodes, and the lowest wins (the reference implementation's
    ``ckpt_best``). A QueryRNN that does not help on the validation images is thus left at s = 1.

    Args:
        learned: the optimizer, changed in place; ``stage="query"`` needs a trained UpdateRNN.
        model: maps images in [0, 1] to logits; its own parameters are not changed.
        x, y: training images in [0, 1] and their labels.
        stage: ``"update"`` (UpdateRNN, standard directions) or ``"query"`` (QueryRNN).
        eps, threat: the threat set.
        num_pairs, sigma: the estimate's q and σ.
        iterations, unroll: steps per episode and per truncated unroll.
        episodes: episodes of this stage.
        batch_size: images per episode.
        lr: Adam's step size.
        kappa: margin confidence κ of the attack loss.
        seed: seeds the images of each episode and the directions.
        validation: held-out (images, labels) to choose the kept parameters, or ``None`` (keep
            the last).
        validate_every: episodes between validations.
        log: called with one line per episode (``None``: silent).

    Returns:
        per episode: ``{"episode", "stage", "meta_loss" (mean over its unrolls), "final_loss"
        (mean attack loss after the last step), "seconds"}``, plus ``"validation_loss"`` where it
        was measured; the first entry of a validated stage is episode 0, before training.

    Raises:
        ValueError: a bad setting; the message names it.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if stage == "query" and "update" not in learned.trained_stages:
        raise ValueError("the QueryRNN stage needs a trained UpdateRNN: run the 'update' stage "
                         "first (the paper's order)")
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {', '.join(THREATS)}, got {threat!r}")
    for name, value in (("iterations", iterations), ("unroll", unroll), ("episodes", episodes),
                        ("batch_size", batch_size), ("num_pairs", num_pairs),
                        ("validate_every", validate_every)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if iterations % unroll:
        raise ValueError(f"iterations ({iterations}) must be a multiple of unroll ({unroll})")
    if learned.settings and learned.settings.get("threat") not in (None, threat):
        raise ValueError(f"this optimizer was meta-trained for {learned.settings['threat']}, not "
                         f"{threat}; start a new one")
    trained = [learned.update_rnn, learned.update_out] if stage == "update" else \
        [learned.query_rnn, learned.query_out]
    params = [p for m in trained for p in m.parameters()]
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    optimizer = torch.optim.Adam(params, lr=lr)
    dims = x[0].numel()
    unit = coordinate_scale(eps, threat, dims)
    history: list[dict[str, Any]] = []

    def validate() -> float:
        assert validation is not None  # called only when there is a validation set
        result = run_attack(model, validation[0], validation[1], eps=eps, threat=threat,
                            optimizer=LEARNED, max_queries=1 + iterations * (2 * num_pairs + 1),
                            num_pairs=num_pairs, sigma=sigma, kappa=kappa, seed=seed,
                            learned=learned)
        return mean_loss_at_step(result, iterations)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    # from here on everything changed is put back by the ``finally`` (or kept on success)
    own_grad = [p.requires_grad for p in learned.parameters()]
    model_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    added = stage not in learned.trained_stages
    best = None
    try:
        for p in learned.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        if added:  # from now on attacks (the validation's) run with this stage's RNN
            learned.trained_stages.append(stage)
        if validation is not None:
            best = (validate(), 0, snapshot())
            history.append({"episode": 0, "stage": stage, "validation_loss": best[0]})
            if log is not None:
                log(f"{stage}: validation loss before training {best[0]:.4f}")
        for episode in range(episodes):
            start = time.perf_counter()
            draw = (STAGES.index(stage) + 1) * 1_000_000 + episode  # each stage its own draws
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(
                pair_seed(seed, draw)))[:batch_size]
            xb, yb = x[pick], y[pick]

            def losses(d: torch.Tensor, rows: torch.Tensor, xb: torch.Tensor = xb,
                       yb: torch.Tensor = yb) -> torch.Tensor:
                return margin_loss(model(xb[rows] + d), yb[rows], kappa=kappa)

            rows = torch.arange(len(xb))
            delta = torch.zeros_like(xb)
            state = learned.initial_state(len(xb), dims, device=xb.device)
            unroll_losses = []
            for first in range(0, iterations, unroll):
                total = xb.new_zeros(())
                for t in range(first, first + unroll):
                    generator = torch.Generator(device=xb.device).manual_seed(
                        pair_seed(pair_seed(seed, draw), t))
                    moved, state, penalty = learned.step(
                        losses, delta, rows, state, num_pairs=num_pairs, sigma=sigma,
                        unit=unit, generator=generator, use_query=stage == "query")
                    delta = project(moved, xb, eps, threat)
                    total = total + losses(delta, rows).mean() + penalty
                meta_loss = total / unroll
                if not torch.isfinite(meta_loss):
                    raise ValueError(f"the meta-loss became {meta_loss.item()} in {stage} episode "
                                     f"{episode + 1}, steps {first}-{first + unroll}; lower the "
                                     f"meta-learning rate (lr = {lr:g})")
                optimizer.zero_grad()
                meta_loss.backward()
                optimizer.step()
                unroll_losses.append(meta_loss.item())
                delta, state = delta.detach(), state.detached()
            with torch.no_grad():
                final = float(losses(delta, rows).mean())
            history.append({"episode": episode + 1, "stage": stage,
                            "meta_loss": sum(unroll_losses) / len(unroll_losses),
                            "final_loss": final, "seconds": time.perf_counter() - start})
            h = history[-1]
            line = (f"{stage} episode {episode + 1}/{episodes}: meta-loss {h['meta_loss']:.4f}, "
                    f"attack loss after {iterations} steps {final:.4f} ({h['seconds']:.1f} s)")
            if best is not None and ((episode + 1) % validate_every == 0 or episode + 1 == episodes):
                h["validation_loss"] = validate()
                line += f"; validation loss {h['validation_loss']:.4f}"
                if h["validation_loss"] < best[0]:
                    best = (h["validation_loss"], episode + 1, snapshot())
            if log is not None:
                log(line)
    except BaseException:
        if added and stage in learned.trained_stages:
            learned.trained_stages.remove(stage)
        raise
    finally:
        for p, flag in zip(model.parameters(), model_grad):
            p.requires_grad_(flag)
        model.train(was_training)
        for p, flag in zip(learned.parameters(), own_grad):
            p.requires_grad_(flag)
    stages = dict(learned.settings.get("stages", {}))
    stages[stage] = {"eps": eps, "num_pairs": num_pairs, "sigma": sigma, "kappa": kappa,
                     "iterations": iterations, "unroll": unroll, "episodes": episodes,
                     "batch_size": batch_size, "lr": lr, "seed": seed}
    if best is not None:
        assert validation is not None  # best is only set with a validation set
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
        stages[stage].update(kept_episode=best[1], validation_loss=best[0],
                             validation_images=len(validation[0]))
        if log is not None:
            log(f"{stage}: kept the parameters after episode {best[1]} (validation loss "
                f"{best[0]:.4f})")
    learned.settings = {**learned.settings, "threat": threat, "stages": stages}
    return history

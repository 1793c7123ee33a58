r"""Accuracy under weight noise: how much a trained model keeps when its parameters are perturbed.

For each noise level and each of ``draws`` draws, one perturbation (see :mod:`robusttrain.noise`)
is applied to the model and kept fixed for the whole evaluation split, like a programmed analog chip,
and accuracy and mean cross-entropy are measured in eval mode.

Pairing: draw k uses ε from the seed ``pair_seed(seed, k)`` at every level (the level only scales
it: w + η·s(w)·ε_k), and the seeds never depend on the model. Models with the same architecture are
therefore compared on the same perturbations, and each model's curve is traced along fixed
directions (common random numbers), which makes differences between levels and between models far
less noisy than independent draws would.

BatchNorm: ``bn_mode="keep"`` (default) uses the running statistics learned in training.
``bn_mode="reestimate"`` re-estimates them after each draw on training batches (a deployment-time
adaptation, reported as such), at level 0 too so the curve is measured under one procedure.

Per model the draws are summarized with :mod:`robusttrain.evaluation.statistics` (mean, spread and
95% CI per level, the levels of a 1/5/10-point drop, the area under the curve).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from robusttrain.evaluation.statistics import (
    CI_METHOD,
    area_under_curve,
    drop_levels,
    level_statistics,
)
from robusttrain.models import MLP
from robusttrain.noise import (
    NOISE_MODELS,
    check_noise,
    draw_directions,
    noisy_parameters,
    preserved_state,
)
from robusttrain.noise.seeds import pair_seed

__all__ = [
    "BN_MODES",
    "CSV_FIELDS",
    "DROP_POINTS",
    "RobustnessResult",
    "draw_seed",
    "evaluate",
    "evaluate_models",
    "level_key",
]

BN_MODES = ("keep", "reestimate")
DROP_POINTS = (1, 5, 10)  # accuracy drops (percentage points) whose noise level is reported
CSV_FIELDS = ("model", "noise", "bn_mode", "level", "draw", "seed", "accuracy", "loss")


def draw_seed(seed: int, draw: int) -> int:
    """Seed of draw ``draw`` of an evaluation with base ``seed``, the same at every level and model."""
    return pair_seed(seed, draw)


# ----- evaluation --------------------------------------------------------------------------------
def _accuracy_and_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = logits.float()
    if logits.ndim != 2 or len(logits) != len(y):
        raise ValueError(f"the model must return logits (N, classes), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} "
                         f"outputs, got {int(y.min())}..{int(y.max())}")
    loss = float(F.cross_entropy(logits, y))
    acc = float(multiclass_accuracy(logits, y, num_classes=num_classes, average="micro",
                                    validate_args=False))
    return acc, loss


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y), in the model's current mode.

    Accuracy is torchmetrics' micro-averaged multiclass accuracy (the fraction of argmax hits).

    Args:
        model: the classifier (logits out).
        x: inputs, on the model's device.
        y: integer class labels, shape (N,).
        batch_size: examples per forward pass.
    """
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        return _accuracy_and_loss(logits, y)


class _FirstLinearShortcut:
    """Exact shortcut for networks that begin with (Flatten →) Linear, such as :class:`MLP`.

    The first layer is linear in its parameters: (W + η·D_W)·u + (b + η·d_b) = (W·u + b) +
    η·(D_W·u + d_b). W·u + b does not depend on the draw and is computed once; D_W·u + d_b once per
    draw; each level then costs one axpy and the rest of the network instead of the first matrix
    product, which is almost all of an MLP's work. The result equals the perturbed forward pass
    up to float rounding (the same sum, in another order). Level 0 never uses it.

    The whole split goes through in one piece (few, large tensor operations), so the shortcut is
    only taken when the two cached first-layer outputs are small (``MAX_CACHED`` elements).
    """

    MAX_CACHED = 1 << 25  # elements of the two cached first-layer outputs (128 MiB in float32)

    def __init__(self, sequence: nn.Sequential, index: int, x: torch.Tensor):
        self.layer = sequence[index]
        self.rest = sequence[index + 1 :]
        with torch.inference_mode():
            self.inputs = sequence[:index](x)  # u: (N, in_features), a view of x
            self.clean = self.layer(self.inputs)  # W·u + b: (N, out_features)
        self.noise = torch.zeros_like(self.clean)

    @classmethod
    def find(
        cls, model: nn.Module, tensors: list[torch.Tensor], x: torch.Tensor
    ) -> _FirstLinearShortcut | None:
        """The shortcut when ``model`` is such a network and the cache is small, else ``None``."""
        if isinstance(model, nn.Sequential):
            sequence = model
        elif isinstance(model, MLP) and type(model).forward is MLP.forward:  # forward = net(x)
            sequence = model.net
        else:
            return None
        index = 0
        while index < len(sequence) and isinstance(sequence[index], (nn.Flatten, nn.Identity)):
            index += 1
        if index == len(sequence):
            return None
        layer = sequence[index]
        if not isinstance(layer, nn.Linear):
            return None
        if not any(t is layer.weight for t in tensors):
            return None
        if 2 * len(x) * layer.out_features > cls.MAX_CACHED:
            return None
        return cls(sequence, index, x)

    def set_draw(self, directions: dict[int, torch.Tensor]) -> None:
        """Cache D_W·u + d_b for this draw (``directions``: id(tensor) -> s(w)·ε)."""
        weight = directions[id(self.layer.weight)]
        bias = directions.get(id(self.layer.bias)) if self.layer.bias is not None else None
        with torch.inference_mode():
            self.noise = F.linear(self.inputs, weight, bias)

    def logits(self, level: float) -> torch.Tensor:
        """The logits of the model perturbed at ``level`` along the current draw."""
        with torch.inference_mode():
            return self.rest(torch.add(self.clean, self.noise, alpha=level))


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _reestimate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Replace BatchNorm running statistics by their cumulative average over ``batches``.

    Only BatchNorm layers are put in train mode (dropout stays off); their momentum and mode are
    restored afterwards. The caller restores the clean buffers (``preserved_state``).
    """
    bns = _batchnorms(model)
    saved = [(bn.momentum, bn.training) for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: equal weight to every batch
            bn.train()
        with torch.no_grad():
            for xb in batches:
                model(xb)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)


@dataclass
class RobustnessResult:
    """Every measurement of an evaluation and its settings.

    Attributes:
        rows: one dict per (model, level, draw) with the keys of ``CSV_FIELDS``.
        summaries: per model: clean accuracy, per-level statistics, drop levels, AUC, settings.
        settings: noise, levels, draws, seed, bn_mode, included tensors, evaluation size.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def level_key(level: float) -> str:
    """The key of ``level`` in a summary's ``levels`` (``f"{level:g}"``, e.g. ``"0.05"``)."""
    return f"{level:g}"


def _check_levels(noise: str, levels: Sequence[float]) -> list[float]:
    checked = [check_noise(noise, level) for level in levels]
    keys = [level_key(level) for level in checked]
    if len(set(keys)) != len(keys):
        raise ValueError(f"noise levels must be distinct, got {checked}")
    # level 0 (the clean model) is always evaluated: the drops are measured from it
    return sorted({0.0, *checked})


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def evaluate_models(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise: str = "relative",
    levels: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2),
    draws: int = 50,
    seed: int = 0,
    batch_size: int = 2000,
    bn_mode: str = "keep",
    bn_data: torch.Tensor | None = None,
    bn_batches: int = 10,
    bn_batch_size: int = 256,
    include_bias: bool = False,
    include_norm: bool = False,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RobustnessResult:
    """Accuracy and loss of each model under ``draws`` weight-noise draws at each level.

    Draw k perturbs every model along ε from ``draw_seed(seed, k)`` at every level, so models of
    one architecture are compared on the same perturbations. Level 0 (the clean model) is always
    evaluated, once. Parameters, buffers and train/eval modes of every model are restored bit for
    bit afterwards, also when the evaluation is interrupted.

    Work that does not depend on the draw is done once per model: the clean weights, the scales
    s(w) and, for networks that begin with (Flatten →) Linear such as MLPs, the clean first-layer
    output W·u + b; each draw then costs one product D·u plus, per level, the rest of the network
    (equal to the full perturbed forward pass up to float rounding).

    Args:
        models: name -> model. Evaluated in eval mode.
        x: evaluation inputs; moved to each model's device.
        y: integer labels, shape (N,).
        noise: ``"relative"``, ``"absolute"`` or ``"multiplicative"`` (see :mod:`robusttrain.noise`).
        levels: noise levels (η, or σ for absolute noise), distinct, each >= 0.
        draws: draws per level (>= 1).
        seed: base seed of the draws.
        batch_size: examples per forward pass.
        bn_mode: ``"keep"`` the trained BatchNorm statistics, or ``"reestimate"`` them after each
            draw on ``bn_batches`` batches of ``bn_batch_size`` examples of ``bn_data``.
        bn_data: training inputs, needed for ``"reestimate"``; one fixed random subset (chosen
            with ``seed``) serves every draw and model.
        bn_batches: batches used to re-estimate BatchNorm statistics.
        bn_batch_size: examples per re-estimation batch.
        include_bias: perturb the biases of Linear/Conv layers too.
        include_norm: perturb normalization weights and biases too.
        progress: show a tqdm progress bar over draws.
        on_row: called with each measurement row as soon as it exists.

    Returns:
        The rows, per-model summaries and settings.

    Raises:
        ValueError: bad settings or inputs; the message names the problem.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")
    levels = _check_levels(noise, levels)
    _check_int("draws", draws, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    if not models:
        raise ValueError("no models to evaluate")
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"need inputs (N, ...) and labels (N,) with N > 0, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    bn_subset = None
    if bn_mode == "reestimate":
        if bn_data is None or len(bn_data) == 0:
            raise ValueError("bn_mode='reestimate' needs bn_data (training inputs)")
        _check_int("bn_batches", bn_batches, 1)
        _check_int("bn_batch_size", bn_batch_size, 1)
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(bn_data), generator=generator)[: bn_batches * bn_batch_size]
        bn_subset = bn_data[chosen.to(bn_data.device)]

    result = RobustnessResult(
        settings={
            "noise": noise, "levels": levels, "draws": draws, "seed": seed, "bn_mode": bn_mode,
            "bn_batches": bn_batches if bn_mode == "reestimate" else None,
            "bn_batch_size": bn_batch_size if bn_mode == "reestimate" else None,
            "include_bias": include_bias, "include_norm": include_norm,
            "examples": len(y), "ci_method": CI_METHOD,
            "pairing": "draw k uses seed pair_seed(seed, k) at every level and for every model",
        }
    )
    plan = _Plan(noise=noise, levels=levels, draws=draws, seed=seed, batch_size=batch_size,
                 bn_subset=bn_subset, bn_batch_size=bn_batch_size, include_bias=include_bias,
                 include_norm=include_norm, on_row=on_row)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models) * draws, desc="weight-noise draws", unit="draw",
                   file=sys.stderr)
    try:
        for name, model in models.items():
            rows = _evaluate_one(name, model, x, y, plan, bar)
            result.rows.extend(rows)
            result.summaries[name] = _summarize(model, rows, plan, result.settings)
    finally:
        if bar is not None:
            bar.close()
    return result


@dataclass(frozen=True)
class _Plan:
    """The validated settings of one evaluation, shared by all models."""

    noise: str
    levels: list[float]  # sorted, starting with 0
    draws: int
    seed: int
    batch_size: int
    bn_subset: torch.Tensor | None  # the BatchNorm re-estimation inputs, None for "keep"
    bn_batch_size: int
    include_bias: bool
    include_norm: bool
    on_row: Callable[[dict[str, Any]], None] | None


def _evaluate_one(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: _Plan, bar: Any
) -> list[dict[str, Any]]:
    """All rows of one model: level 0 once, then each draw at every level > 0."""
    noise, seed = plan.noise, plan.seed
    tensors = [p for _, p in noisy_parameters(model, plan.include_bias, plan.include_norm)]
    device = tensors[0].device
    x, y = x.to(device), y.to(device)
    bn_batches = None
    if plan.bn_subset is not None:
        bn_subset = plan.bn_subset.to(device)
        bn_batches = [bn_subset[i : i + plan.bn_batch_size]
                      for i in range(0, len(bn_subset), plan.bn_batch_size)]
    bn_mode = "keep" if bn_batches is None else "reestimate"
    modes = {m: m.training for m in model.modules()}
    rows: list[dict[str, Any]] = []
    shortcut: _FirstLinearShortcut | None = None

    def measure(level: float, draw: int) -> None:
        if bn_batches is not None:
            _reestimate_batchnorm(model, bn_batches)
        if shortcut is not None and level > 0:
            acc, loss = _accuracy_and_loss(shortcut.logits(level), y)
        else:
            acc, loss = evaluate(model, x, y, plan.batch_size)
        row = {"model": name, "noise": noise, "bn_mode": bn_mode, "level": level, "draw": draw,
               "seed": draw_seed(seed, draw), "accuracy": acc, "loss": loss}
        rows.append(row)
        if plan.on_row is not None:
            plan.on_row(row)

    try:
        model.eval()
        with preserved_state(model):
            # computed once, not per draw: the clean values (which also set the scales s(w)),
            # the ε buffer and, for MLPs, the clean first-layer output; per draw: ε and the
            # directions s(w)·ε, shared by all levels
            clean = [p.detach().clone() for p in tensors]
            eps_buffer = torch.empty(sum(c.numel() for c in clean), device=device)
            measure(0.0, 0)
            # (BatchNorm statistics, re-estimated or not, live in the rest of the network)
            shortcut = _FirstLinearShortcut.find(model, tensors, x)
            for draw in range(plan.draws):
                generator = torch.Generator(device=device).manual_seed(draw_seed(seed, draw))
                directions = draw_directions(clean, noise, generator, out=eps_buffer)
                if shortcut is not None:
                    shortcut.set_draw({id(p): d for p, d in zip(tensors, directions)})
                for level in plan.levels[1:]:
                    with torch.no_grad():
                        for p, c, direction in zip(tensors, clean, directions):
                            p.copy_(c).add_(direction, alpha=level)  # w + η·s(w)·ε
                    measure(level, draw)
                if bar is not None:
                    bar.update(1)
    finally:
        for module, training in modes.items():
            module.training = training
    # rows in (level, draw) order
    rows.sort(key=lambda r: (r["level"], r["draw"]))
    return rows


def _summarize(
    model: nn.Module, rows: list[dict[str, Any]], plan: _Plan, settings: dict[str, Any]
) -> dict[str, Any]:
    levels = plan.levels
    stats: dict[str, dict[str, Any]] = {}
    for level in levels:
        accs = [r["accuracy"] for r in rows if r["level"] == level]
        losses = [r["loss"] for r in rows if r["level"] == level]
        loss_stats = level_statistics(losses)
        stats[level_key(level)] = {"level": level, **level_statistics(accs),
                                    "loss_mean": loss_stats["mean"], "loss_std": loss_stats["std"]}
    means = [stats[level_key(level)]["mean"] for level in levels]
    clean = stats[level_key(0.0)]["mean"]
    drops = drop_levels(levels, means, clean, drops=[p / 100 for p in DROP_POINTS])
    selected = noisy_parameters(model, plan.include_bias, plan.include_norm)
    summary: dict[str, Any] = {
        "clean_accuracy": clean,
        "clean_loss": stats[level_key(0.0)]["loss_mean"],
        "levels": stats,
        **{f"drop_{p}pt": d for p, d in zip(DROP_POINTS, drops)},
        "auc": area_under_curve(levels, means, normalize=False),
        "auc_normalized": area_under_curve(levels, means, normalize=True),
        "noise": settings["noise"],
        "bn_mode": settings["bn_mode"],
        "batchnorm_layers": len(_batchnorms(model)),
        "draws": settings["draws"],
        "seed": settings["seed"],
        "perturbed_tensors": [n for n, _ in selected],
        "perturbed_values": int(sum(p.numel() for _, p in selected)),
    }
    return summary

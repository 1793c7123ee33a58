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

Per model and level the accuracies of the draws are summarized by mean, standard deviation,
5th/95th percentile, minimum and a 95% confidence interval of the mean,

    mean ± t_{0.975, n−1} · std / √n      (Student t, n = draws),

and per model by the levels where mean accuracy falls 1, 5 and 10 points below the clean accuracy
(linear interpolation) and the trapezoidal area under the accuracy-vs-level curve.

``robusttrain robustness --ckpt A.ckpt --ckpt B.ckpt --noise relative --levels 0,0.05,0.1
--draws 50 --out DIR`` writes ``robustness.csv`` (one row per model, level and draw),
``summary.json`` and ``robustness.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from robusttrain.files import write_atomic
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
    "DROP_POINTS",
    "RobustnessResult",
    "area_under_curve",
    "draw_seed",
    "drop_levels",
    "evaluate",
    "evaluate_models",
    "format_table",
    "level_statistics",
    "main",
    "plot_robustness",
    "t_quantile_975",
    "write_report",
]

BN_MODES = ("keep", "reestimate")
DROP_POINTS = (1, 5, 10)  # accuracy drops (percentage points) whose noise level is reported
CSV_FIELDS = ("model", "noise", "bn_mode", "level", "draw", "seed", "accuracy", "loss")

# 97.5% quantiles of Student's t (two-sided 95%), df = 1..30, from standard tables
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959963984540054
CI_METHOD = (
    "95% CI of the mean over draws: mean ± t·std/√n, Student t quantile from a table for df ≤ 30 "
    "and the Cornish–Fisher expansion around the normal quantile beyond"
)


# ----- statistics (pure functions) -------------------------------------------------------------
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (no scipy).

    A table (3 decimals) for df ≤ 30; beyond, the Cornish–Fisher expansion around z = 1.959964,

        t ≈ z + (z³ + z)/(4·df) + (5z⁵ + 16z³ + 3z)/(96·df²),

    whose error is below 2e-4 for df > 30 and vanishes as df grows.

    Args:
        df: degrees of freedom, >= 1.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def level_statistics(values: Sequence[float]) -> dict[str, float | int | None]:
    """Summary of the draws at one level: n, mean, std, percentiles, extremes, 95% CI of the mean.

    ``std`` is the sample standard deviation (ddof 1); ``p5``/``p95`` are linear-interpolation
    percentiles (numpy's default); the CI is mean ± t_{0.975, n−1}·std/√n (``None`` for n = 1).

    Args:
        values: one value per draw (at least one, all finite).
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"need a non-empty list of finite numbers, got {list(arr.ravel())[:5]}")
    n = int(arr.size)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "p5": float(np.percentile(arr, 5)),
        "p95": float(np.percentile(arr, 95)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "ci95_low": None if half is None else mean - half,
        "ci95_high": None if half is None else mean + half,
    }


def _sorted_curve(levels: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lv = np.asarray(levels, dtype=float)
    val = np.asarray(values, dtype=float)
    if lv.ndim != 1 or lv.shape != val.shape or lv.size == 0:
        raise ValueError(
            f"levels and accuracies must be equally long non-empty lists, got {lv.size} levels "
            f"and {val.size} accuracies"
        )
    if not (np.all(np.isfinite(lv)) and np.all(np.isfinite(val))):
        raise ValueError("levels and accuracies must be finite numbers")
    order = np.argsort(lv, kind="stable")
    lv, val = lv[order], val[order]
    if np.any(np.diff(lv) == 0):
        raise ValueError(f"levels must be distinct, got {sorted(lv.tolist())}")
    return lv, val


def drop_levels(
    levels: Sequence[float],
    accuracies: Sequence[float],
    clean: float,
    drops: Sequence[float] = (0.01, 0.05, 0.10),
) -> list[float | None]:
    """The noise level at which accuracy first falls ``drop`` below ``clean``, for each drop.

    With the curve sorted by level, the first level i with acc_i <= clean − drop is found and the
    crossing is interpolated linearly on the segment before it,

        level = l_{i−1} + (acc_{i−1} − target) / (acc_{i−1} − acc_i) · (l_i − l_{i−1}),

    which is l_i itself when the curve meets the target exactly at a grid point. ``None`` when the
    curve never falls that far (not reached within the evaluated levels).

    Args:
        levels: evaluated noise levels (distinct; any order).
        accuracies: mean accuracy at each level, as fractions.
        clean: accuracy of the unperturbed model, as a fraction.
        drops: the drops, as fractions (0.05 = 5 percentage points).
    """
    lv, acc = _sorted_curve(levels, accuracies)
    out: list[float | None] = []
    for drop in drops:
        target = clean - drop
        # 1e-12 absorbs rounding in clean − drop (0.9 − 0.05 = 0.8500000000000001)
        below = np.nonzero(acc <= target + 1e-12)[0]
        if below.size == 0:
            out.append(None)
            continue
        i = int(below[0])
        if i == 0 or acc[i - 1] <= acc[i]:
            out.append(float(lv[i]))
            continue
        frac = min(1.0, (acc[i - 1] - target) / (acc[i - 1] - acc[i]))
        out.append(float(lv[i - 1] + frac * (lv[i] - lv[i - 1])))
    return out


def area_under_curve(
    levels: Sequence[float], accuracies: Sequence[float], normalize: bool = True
) -> float:
    """Trapezoidal area under accuracy vs level, Σ_i (l_{i+1} − l_i)·(acc_i + acc_{i+1})/2.

    Args:
        levels: evaluated noise levels (distinct; any order).
        accuracies: mean accuracy at each level.
        normalize: divide by the level range (max − min), which turns the area into the average
            accuracy over the range; with a single level, that level's accuracy.
    """
    lv, acc = _sorted_curve(levels, accuracies)
    if lv.size < 2:
        return float(acc[0]) if normalize else 0.0
    area = float(np.sum(np.diff(lv) * (acc[1:] + acc[:-1]) / 2))
    return area / float(lv[-1] - lv[0]) if normalize else area


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
        from robusttrain.models import MLP

        if isinstance(model, nn.Sequential):
            sequence = model
        elif isinstance(model, MLP) and type(model).forward is MLP.forward:  # forward = net(x)
            sequence = model.net
        else:
            return None
        index = 0
        while index < len(sequence) and isinstance(sequence[index], (nn.Flatten, nn.Identity)):
            index += 1
        if index == len(sequence) or not isinstance(sequence[index], nn.Linear):
            return None
        layer = sequence[index]
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


def _level_key(level: float) -> str:
    return f"{level:g}"


def _check_levels(noise: str, levels: Sequence[float]) -> list[float]:
    checked = [check_noise(noise, level) for level in levels]
    keys = [_level_key(level) for level in checked]
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
    stats = {}
    for level in levels:
        accs = [r["accuracy"] for r in rows if r["level"] == level]
        losses = [r["loss"] for r in rows if r["level"] == level]
        loss_stats = level_statistics(losses)
        stats[_level_key(level)] = {"level": level, **level_statistics(accs),
                                    "loss_mean": loss_stats["mean"], "loss_std": loss_stats["std"]}
    means = [stats[_level_key(level)]["mean"] for level in levels]
    clean = stats[_level_key(0.0)]["mean"]
    drops = drop_levels(levels, means, clean, drops=[p / 100 for p in DROP_POINTS])
    selected = noisy_parameters(model, plan.include_bias, plan.include_norm)
    summary: dict[str, Any] = {
        "clean_accuracy": clean,
        "clean_loss": stats[_level_key(0.0)]["loss_mean"],
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


# ----- report -------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: RobustnessResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``robustness.csv``, ``summary.json`` and ``robustness.png`` atomically into ``out_dir``.

    The CSV has one row per (model, level, draw) with the columns of ``CSV_FIELDS`` (``seed`` is
    the draw's seed; level 0 is the clean model) at full float precision, so statistics
    recomputed from it match ``summary.json`` exactly. The JSON holds the settings and, per model,
    the clean accuracy, per-level statistics, drop levels, AUC and which tensors were perturbed.

    Args:
        result: what :func:`evaluate_models` returned.
        out_dir: output folder (created if missing).

    Returns:
        The paths, keyed ``"csv"``, ``"json"`` and ``"png"``.
    """
    out = Path(out_dir)
    paths = {"csv": out / "robustness.csv", "json": out / "summary.json",
             "png": out / "robustness.png"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: row[k] for k in CSV_FIELDS})
    write_atomic(paths["csv"], buf.getvalue().encode())
    summary = _json_safe({"settings": result.settings, "models": result.summaries})
    text = json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    write_atomic(paths["json"], text.encode())
    plot_robustness(result.summaries, paths["png"])
    return paths


def _percent(stats: list[Mapping[str, Any]], key: str) -> np.ndarray:
    """``100 * stats[i][key]`` per level; the mean where a CI is undefined (a single draw)."""
    return np.array([100 * (s[key] if s[key] is not None else s["mean"]) for s in stats])


_LEVEL_LABELS = {
    "relative": "η (noise std / max|W| of each tensor)",
    "absolute": "σ (noise std)",
    "multiplicative": "η (noise std / |w| of each weight)",
}


def plot_robustness(
    summaries: Mapping[str, Mapping[str, Any]] | RobustnessResult, path: str | Path
) -> None:
    """Accuracy vs noise level, models overlaid; written atomically as a PNG (Agg backend).

    Each model gets its mean-accuracy line, a shaded band from the 5th to the 95th percentile of
    the draws, error bars for the 95% CI of the mean, and a dotted line at its clean accuracy; the
    legend says which is which.

    Args:
        summaries: model name -> summary as in ``summary.json`` (``result.summaries``), or a
            :class:`RobustnessResult`.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(summaries, RobustnessResult):
        summaries = summaries.summaries
    if not summaries:
        raise ValueError("nothing to plot: no model summaries")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    handles = []
    noise = bn_mode = draws = None
    for i, (name, summary) in enumerate(summaries.items()):
        color = plt.cm.tab10(i % 10)
        stats = sorted(summary["levels"].values(), key=lambda s: s["level"])
        lv = np.array([s["level"] for s in stats])
        mean = _percent(stats, "mean")
        ax.fill_between(lv, _percent(stats, "p5"), _percent(stats, "p95"), color=color,
                        alpha=0.15, lw=0)
        ci_low, ci_high = _percent(stats, "ci95_low"), _percent(stats, "ci95_high")
        ax.errorbar(lv, mean, yerr=[mean - ci_low, ci_high - mean], fmt="o-", color=color,
                    markersize=3, capsize=2, lw=1.3)
        ax.axhline(100 * summary["clean_accuracy"], color=color, ls=":", lw=0.9)
        handles.append(Line2D([], [], color=color, marker="o", markersize=3, label=name))
        noise, bn_mode, draws = summary.get("noise"), summary.get("bn_mode"), summary.get("draws")
    handles += [
        Patch(color="gray", alpha=0.25, label="band: 5th–95th percentile of draws"),
        Line2D([], [], color="gray", marker="|", ls="none", label="error bar: 95% CI of the mean"),
        Line2D([], [], color="gray", ls=":", label="dotted: clean accuracy"),
    ]
    ax.set_xlabel(_LEVEL_LABELS.get(noise, "noise level"))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy under {noise} weight noise ({draws} draws per level, "
                 f"BatchNorm statistics: {bn_mode})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue())


def _fmt_level(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.3g}"


def format_table(result: RobustnessResult) -> str:
    """A plain-text table: clean accuracy, mean accuracy per level (%), drop levels, AUC.

    Args:
        result: what :func:`evaluate_models` returned.
    """
    levels = [level for level in result.settings["levels"] if level != 0]
    head = (["model", "clean"] + [f"{level:g}" for level in levels]
            + [f"-{p}pt at" for p in DROP_POINTS] + ["avg acc (AUC/range)"])
    lines = [head]
    for name, s in result.summaries.items():
        row = [name, f"{100 * s['clean_accuracy']:.2f}"]
        row += [f"{100 * s['levels'][_level_key(level)]['mean']:.2f}" for level in levels]
        row += [_fmt_level(s[f"drop_{p}pt"]) for p in DROP_POINTS]
        row.append(f"{100 * s['auc_normalized']:.2f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


# ----- command line -------------------------------------------------------------------------------
class _UsageError(ValueError):
    """A command-line mistake; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise _UsageError(f"{message} (see --help)")


def _parse_levels(text: str) -> list[float]:
    parts = [v.strip() for v in text.split(",") if v.strip()]
    try:
        levels = [float(v) for v in parts]
    except ValueError:
        raise _UsageError(f"--levels must be comma-separated numbers >= 0, got {text!r}") from None
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise _UsageError(f"--levels must be comma-separated numbers >= 0, got {text!r}")
    if len({_level_key(v) for v in levels}) != len(levels):
        raise _UsageError(f"--levels must be distinct, got {text!r}")
    return levels


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robusttrain robustness",
        description="Accuracy of trained checkpoints under random perturbations of their weights.",
    )
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint written by `robusttrain fit` (repeatable)")
    parser.add_argument("--name", action="append", help="label of each checkpoint, in order")
    parser.add_argument("--noise", default="relative", help=f"one of {', '.join(NOISE_MODELS)}")
    parser.add_argument("--levels", default="0,0.02,0.05,0.1,0.2",
                        help="comma-separated noise levels (0, the clean model, is always added)")
    parser.add_argument("--draws", default="50", help="draws per level (default 50)")
    parser.add_argument("--seed", default="0", help="base seed of the draws (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--data-dir", help="override the data_dir saved in the checkpoint")
    parser.add_argument("--batch-size", default="2000", help="examples per forward pass")
    parser.add_argument("--bn-mode", choices=BN_MODES, default="keep",
                        help="keep the trained BatchNorm statistics or re-estimate them per draw")
    parser.add_argument("--bn-batches", default="10", help="batches for --bn-mode reestimate")
    parser.add_argument("--include-bias", action="store_true", help="perturb biases too")
    parser.add_argument("--include-norm", action="store_true",
                        help="perturb normalization weights and biases too")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _int_option(flag: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _UsageError(f"{flag} must be an integer >= {low}, got {text!r}") from None
    if value < low:
        raise _UsageError(f"{flag} must be an integer >= {low}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``robusttrain robustness``: evaluate checkpoints under weight noise (see module docstring).

    Args:
        argv: the arguments after ``robustness``; default ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on bad input (after printing one line to stderr).
    """
    try:
        args = _build_parser().parse_args(argv)
        return _run(args)
    except ValueError as err:  # bad options, CheckpointError, DatasetError are ValueErrors
        message = " ".join(str(err).split("\n")[0].split())
        print(f"robusttrain robustness: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    levels = _parse_levels(args.levels)
    if args.noise not in NOISE_MODELS:
        raise _UsageError(f"unknown noise model {args.noise!r}; choose one of "
                          f"{', '.join(NOISE_MODELS)}")
    draws = _int_option("--draws", args.draws, 1)
    seed = _int_option("--seed", args.seed, 0)
    batch_size = _int_option("--batch-size", args.batch_size, 1)
    bn_batches = _int_option("--bn-batches", args.bn_batches, 1)
    if args.name and len(args.name) != len(args.ckpt):
        raise _UsageError(f"{len(args.name)} --name for {len(args.ckpt)} --ckpt; give one each")
    names = args.name or [_default_name(p) for p in args.ckpt]
    if len(set(names)) != len(names):
        raise _UsageError(f"two checkpoints have the same name {names}; label them with --name")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _UsageError(f"--device must be cpu or cuda[:k], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda given but no CUDA device is available; use --device cpu")

    from robusttrain.data import ImageDataModule
    from robusttrain.training.checkpoints import load_checkpoint

    loaded = [load_checkpoint(p) for p in args.ckpt]
    data = {k: v for k, v in loaded[0].data.items() if not k.startswith("_")}
    if "dataset" not in data:
        raise _UsageError(f"{args.ckpt[0]} holds no data settings (no 'dataset' in "
                          "datamodule_hyper_parameters); use a checkpoint written by "
                          "`robusttrain fit`")
    for other, path in zip(loaded[1:], args.ckpt[1:]):
        if other.data.get("dataset") != data["dataset"]:
            raise _UsageError(f"{path} was trained on {other.data.get('dataset')}, "
                              f"{args.ckpt[0]} on {data['dataset']}; compare like with like")
    if args.data_dir:
        data["data_dir"] = args.data_dir
    try:
        datamodule = ImageDataModule(**data)
    except TypeError as err:  # a data setting this version does not know
        raise _UsageError(f"{args.ckpt[0]}: its data settings do not fit ImageDataModule "
                          f"({err})") from None
    datamodule.setup("fit" if args.split == "val" or args.bn_mode == "reestimate" else "test")
    if args.split == "val":
        if len(datamodule.val_y) == 0:
            raise _UsageError("--split val but the checkpoint's data settings have val_size 0; "
                              "use --split test")
        x, y = datamodule.val_x, datamodule.val_y
    else:
        x, y = datamodule.test_x, datamodule.test_y
    models = {n: c.backbone.to(device) for n, c in zip(names, loaded)}
    result = evaluate_models(
        models, x.to(device), y.to(device), noise=args.noise, levels=levels, draws=draws,
        seed=seed, batch_size=batch_size, bn_mode=args.bn_mode,
        bn_data=datamodule.train_x if args.bn_mode == "reestimate" else None,
        bn_batches=bn_batches, include_bias=args.include_bias, include_norm=args.include_norm,
        progress=not args.no_progress,
    )
    paths = write_report(result, args.out)
    bn_note = {"keep": "kept from training", "reestimate": "re-estimated after each draw"}
    print(f"{args.noise} weight noise, {draws} draws per level, {args.split} split "
          f"({len(y)} examples), BatchNorm statistics {bn_note[args.bn_mode]}; accuracy in %")
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _default_name(path: str) -> str:
    """``runs/<name>/version_k/checkpoints/last.ckpt`` -> ``<name>/version_k``; else the stem."""
    parts = Path(path).parts
    if len(parts) >= 4 and parts[-2] == "checkpoints":
        return f"{parts[-4]}/{parts[-3]}"
    return Path(path).stem

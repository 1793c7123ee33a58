"""Accuracy of trained models run as a deployment: quantized, faulty, noisy hardware.

:func:`evaluate_deployment` runs every model through a deployment
(:mod:`robusttrain.noise.deployment`) over ``device_draws`` chips (stuck-at faults, bit flips)
× ``inference_draws`` runs of inferences (read noise) each, optionally at every value of one
field of one step (a sweep: bits, fault rate, noise level), and summarizes the accuracies with the
statistics of the weight-noise evaluation (mean, std, percentiles, 95% CI of the mean).

Draws are paired: chip d has the seed ``draw_seed(seed, d)`` and its inference run i the seed
``draw_seed(draw_seed(seed, d), i)`` for every model and every swept value, so two models are
compared on the same faults and the same read noise. A deployment without random device steps
is evaluated on one chip, one without read noise on one run of inferences.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robusttrain.evaluation.report import draw_accuracy_curve, outside_legend, save_figure
from robusttrain.evaluation.robustness import _check_int, draw_seed, evaluate
from robusttrain.evaluation.statistics import CI_METHOD, level_statistics
from robusttrain.files import write_atomic
from robusttrain.noise.deployment import Deployment, deployed, parse_deployment

__all__ = [
    "DEPLOYMENT_CSV_FIELDS",
    "DeploymentResult",
    "evaluate_deployment",
    "format_deployment_table",
    "parse_sweep",
    "write_deployment_report",
]

DEPLOYMENT_CSV_FIELDS = ["model", "value", "device_draw", "inference_draw", "device_seed",
                         "inference_seed", "accuracy", "loss"]


@dataclass
class DeploymentResult:
    """Rows (one per model, swept value, chip and inference run), summaries and settings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def parse_sweep(text: str) -> tuple[str, str, list[Any]]:
    """``"quantize.bits=2,3,4"`` -> ``("quantize", "bits", [2, 3, 4])`` (numbers as int or float).

    Raises:
        ValueError: not of the form ``kind.field=v1,v2,...``.
    """
    try:
        target, values = text.split("=", 1)
        kind, name = target.strip().split(".", 1)
        parsed = []
        for value in values.split(","):
            number = float(value)
            parsed.append(int(number) if number.is_integer() and "." not in value else number)
    except ValueError:
        raise ValueError(f"--sweep must look like kind.field=v1,v2 (e.g. quantize.bits=2,3,4), "
                         f"got {text!r}") from None
    if not parsed:
        raise ValueError(f"--sweep {text!r} has no values")
    return kind, name, parsed


def evaluate_deployment(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    deployment: Any,
    *,
    sweep: tuple[str, str, Sequence[Any]] | None = None,
    device_draws: int = 5,
    inference_draws: int = 10,
    seed: int = 0,
    batch_size: int = 2000,
    progress: bool = True,
) -> DeploymentResult:
    """Accuracy of each model through ``deployment`` (at each value of ``sweep``).

    Args:
        models: name -> model, evaluated in eval mode and restored bit for bit afterwards.
        x, y: evaluation inputs and integer labels.
        deployment: anything :func:`robusttrain.noise.deployment.parse_deployment` accepts.
        sweep: ``(kind, field, values)``: evaluate the deployment with that field of its
            ``kind`` step set to each value (see :func:`parse_sweep`).
        device_draws: chips per value (used when the deployment has faults or bit flips).
        inference_draws: runs of inferences per chip (used when it has read noise).
        seed: base seed of the draws.
        batch_size: examples per forward pass.
        progress: a progress bar over the evaluations.

    Raises:
        ValueError: bad settings; the message names the problem.
    """
    base = parse_deployment(deployment)
    _check_int("device_draws", device_draws, 1)
    _check_int("inference_draws", inference_draws, 1)
    if not models:
        raise ValueError("no models to evaluate")
    values: list[Any] = [None] if sweep is None else list(sweep[2])
    variants = [(v, base if sweep is None else base.replace(sweep[0], sweep[1], v)) for v in values]
    result = DeploymentResult(settings={
        "deployment": base.to_list(), "deployment_name": base.name,
        "sweep": None if sweep is None else f"{sweep[0]}.{sweep[1]}", "values": values,
        "device_draws": device_draws, "inference_draws": inference_draws, "seed": seed,
        "examples": len(y), "ci_method": CI_METHOD,
        "pairing": "chip d: draw_seed(seed, d); its inference run i: draw_seed(chip seed, i); "
                   "the same for every model and value",
    })
    total = sum(_draws(dep, device_draws, inference_draws) for _, dep in variants) * len(models)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="deployment draws", unit="draw", file=sys.stderr)
    try:
        for name, model in models.items():
            device = next(model.parameters()).device
            xs, ys = x.to(device), y.to(device)
            modes = {m: m.training for m in model.modules()}
            model.eval()
            try:
                clean_acc, clean_loss = evaluate(model, xs, ys, batch_size)
                per_value = {}
                for value, dep in variants:
                    rows = _evaluate_variant(name, model, xs, ys, dep, value, device_draws,
                                             inference_draws, seed, batch_size, bar)
                    result.rows.extend(rows)
                    per_value[_key(value)] = _summarize(value, rows)
            finally:
                for module, training in modes.items():
                    module.training = training
            result.summaries[name] = {"clean_accuracy": clean_acc, "clean_loss": clean_loss,
                                      "values": per_value}
    finally:
        if bar is not None:
            bar.close()
    return result


def _draws(dep: Deployment, device_draws: int, inference_draws: int) -> int:
    return ((device_draws if dep.random_device else 1)
            * (inference_draws if dep.random_inference else 1))


def _key(value: Any) -> str:
    return "all" if value is None else f"{value:g}"


def _evaluate_variant(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, dep: Deployment, value: Any,
    device_draws: int, inference_draws: int, seed: int, batch_size: int, bar: Any,
) -> list[dict[str, Any]]:
    rows = []
    for d in range(device_draws if dep.random_device else 1):
        device_seed = draw_seed(seed, d)
        for i in range(inference_draws if dep.random_inference else 1):
            inference_seed = draw_seed(device_seed, i)
            with deployed(model, dep, device_seed=device_seed, inference_seed=inference_seed):
                acc, loss = evaluate(model, x, y, batch_size)
            rows.append({"model": name, "value": value, "device_draw": d, "inference_draw": i,
                         "device_seed": device_seed, "inference_seed": inference_seed,
                         "accuracy": acc, "loss": loss})
            if bar is not None:
                bar.update(1)
    return rows


def _summarize(value: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["accuracy"] for r in rows]
    chips = sorted({r["device_draw"] for r in rows})
    chip_means = [float(np.mean([r["accuracy"] for r in rows if r["device_draw"] == d]))
                  for d in chips]
    return {"value": value, **level_statistics(accs),
            "loss_mean": float(np.mean([r["loss"] for r in rows])),
            "chips": len(chips), "chip_mean_std": float(np.std(chip_means, ddof=1))
            if len(chips) > 1 else 0.0}


def format_deployment_table(result: DeploymentResult) -> str:
    """Clean accuracy and mean accuracy (%) through the deployment at each swept value."""
    values = result.settings["values"]
    label = result.settings["sweep"] or "deployed"
    head = ["model", "clean"] + [label if v is None else f"{label}={_key(v)}" for v in values]
    lines = [head]
    for name, s in result.summaries.items():
        row = [name, f"{100 * s['clean_accuracy']:.2f}"]
        for v in values:
            stats = s["values"][_key(v)]
            row.append(f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


def write_deployment_report(result: DeploymentResult, out_dir: str | Path) -> dict[str, Path]:
    """``deployment.csv``, ``deployment.json`` and (with a sweep) ``deployment.png``, atomically."""
    out = Path(out_dir)
    paths = {"csv": out / "deployment.csv", "json": out / "deployment.json"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DEPLOYMENT_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in DEPLOYMENT_CSV_FIELDS})
    write_atomic(paths["csv"], buf.getvalue().encode())
    text = json.dumps({"settings": result.settings, "models": result.summaries}, indent=2,
                      allow_nan=False, ensure_ascii=False) + "\n"
    write_atomic(paths["json"], text.encode())
    if result.settings["sweep"] is not None:
        paths["png"] = out / "deployment.png"
        _plot(result, paths["png"])
    return paths


def _plot(result: DeploymentResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    values = result.settings["values"]
    handles = [
        draw_accuracy_curve(ax, i, name, values, [summary["values"][_key(v)] for v in values],
                            summary["clean_accuracy"])
        for i, (name, summary) in enumerate(result.summaries.items())
    ]
    ax.set_xlabel(result.settings["sweep"])
    ax.set_ylabel("accuracy (%)")
    steps = " → ".join(step["kind"] for step in result.settings["deployment"])
    ax.set_title(f"accuracy through the deployment {result.settings['deployment_name']} "
                 f"({steps})", fontsize=9)
    ax.grid(alpha=0.3)
    outside_legend(ax, handles)
    fig.tight_layout()
    save_figure(fig, path)

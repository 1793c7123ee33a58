"""Accuracy under weight noise: how much a trained model keeps when its parameters are perturbed.

For each noise level and each of ``draws`` draws, one perturbation is applied to the model and kept
for the whole evaluation split (like a programmed chip), and accuracy and loss are measured. Draw k
uses ε from seed ``pair_seed(seed, k)`` at every level (the level only scales it), and the seeds
never depend on the model, so all models are compared on the same perturbation directions
(paired), and a curve is smooth in the level.

``robusttrain robustness --ckpt A.ckpt --ckpt B.ckpt --noise relative --levels 0,0.05,0.1
--draws 50 --out DIR`` writes ``robustness.csv`` (one row per model, level and draw),
``summary.json`` (per-level statistics, drop levels, area under the curve) and ``robustness.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from robusttrain.estimators import pair_seed
from robusttrain.noise import NOISE_MODELS, check_noise, noisy_parameters, perturbed_weights

__all__ = [
    "RobustnessResult",
    "evaluate",
    "evaluate_models",
    "level_statistics",
    "drop_levels",
    "area_under_curve",
    "t_quantile_975",
    "write_report",
    "plot_robustness",
    "main",
]

BN_MODES = ("keep", "reestimate")

# two-sided 95% quantiles of Student's t, df = 1..30 (standard tables)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom.

    A table for df ≤ 30; beyond, the Cornish–Fisher expansion around z = 1.95996
    (t ≈ z + (z³ + z)/(4df) + (5z⁵ + 16z³ + 3z)/(96df²)), accurate to 1e-4 there.
    """
    if df < 1:
        return float("nan")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def level_statistics(values: Sequence[float]) -> dict[str, float]:
    """Mean, std (ddof 1), 5th percentile, minimum and 95% t-interval of the mean."""
    arr = np.asarray(values, dtype=float)
    n = arr.size
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {
        "mean": mean,
        "std": std,
        "p5": float(np.percentile(arr, 5)),
        "min": float(arr.min()),
        "ci95_low": mean - half,
        "ci95_high": mean + half,
        "n": n,
    }


def drop_levels(
    levels: Sequence[float],
    accuracies: Sequence[float],
    clean: float,
    drops: Sequence[float] = (0.01, 0.05, 0.10),
) -> list[float | None]:
    """The noise level where accuracy first falls ``drop`` below ``clean``, per drop.

    Linear interpolation between the two evaluated levels around the crossing; ``None`` when the
    curve never falls that far. Accuracies and drops are fractions (0.05 = 5 points).
    """
    order = np.argsort(levels)
    lv = np.asarray(levels, dtype=float)[order]
    acc = np.asarray(accuracies, dtype=float)[order]
    out: list[float | None] = []
    for drop in drops:
        target = clean - drop
        found = None
        for i in range(len(lv)):
            if acc[i] <= target + 1e-12:
                if i == 0 or acc[i - 1] == acc[i]:
                    found = float(lv[i])
                else:
                    frac = (acc[i - 1] - target) / (acc[i - 1] - acc[i])
                    found = float(lv[i - 1] + frac * (lv[i] - lv[i - 1]))
                break
        out.append(found)
    return out


def area_under_curve(
    levels: Sequence[float], accuracies: Sequence[float], normalize: bool = True
) -> float:
    """Trapezoidal area under accuracy vs level; divided by the level range when ``normalize``."""
    order = np.argsort(levels)
    lv = np.asarray(levels, dtype=float)[order]
    acc = np.asarray(accuracies, dtype=float)[order]
    if lv.size < 2:
        return float(acc[0]) if normalize else 0.0
    area = float(np.sum((lv[1:] - lv[:-1]) * (acc[1:] + acc[:-1]) / 2))
    return area / float(lv[-1] - lv[0]) if normalize else area


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10000
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y), in the model's current mode."""
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    loss = float(F.cross_entropy(logits.float(), y))
    acc = float(multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="micro"))
    return acc, loss


@torch.no_grad()
def _reestimate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    for xb in batches:
        model(xb)
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


@dataclass
class RobustnessResult:
    """Every measurement of an evaluation and its settings.

    Attributes:
        rows: one dict per (model, level, draw): model, noise, level, draw, seed, accuracy, loss.
        summaries: per model: clean accuracy, per-level statistics, drop levels, AUC, settings.
        settings: noise, levels, draws, seed, bn_mode, include_bias, include_norm, tensors.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def evaluate_models(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise: str = "relative",
    levels: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2),
    draws: int = 50,
    seed: int = 0,
    batch_size: int = 10000,
    bn_mode: str = "keep",
    bn_data: torch.Tensor | None = None,
    bn_batches: int = 10,
    include_bias: bool = False,
    include_norm: bool = False,
    progress: bool = True,
) -> RobustnessResult:
    """Accuracy and loss of each model under ``draws`` weight-noise draws at each level.

    Args:
        models: name -> model (put in eval mode here; restored bit for bit afterwards).
        x: evaluation inputs (already on the models' device).
        y: evaluation targets.
        noise: ``"relative"``, ``"absolute"`` or ``"multiplicative"`` (see :mod:`robusttrain.noise`).
        levels: noise levels (η, or σ for absolute noise), each ≥ 0.
        draws: draws per level (≥ 1); level 0 is evaluated once (it has no randomness).
        seed: base seed; draw k uses ``pair_seed(seed, k)`` for every model and level.
        batch_size: evaluation batch size.
        bn_mode: ``"keep"`` the trained BatchNorm statistics, or ``"reestimate"`` them after each
            draw on ``bn_batches`` batches of ``bn_data`` (a deployment-time adaptation).
        bn_data: training inputs for ``"reestimate"``.
        bn_batches: batches used to re-estimate BatchNorm statistics.
        include_bias: perturb biases too.
        include_norm: perturb normalization parameters too.
        progress: show a progress bar over draws.
    """
    levels = [float(v) for v in levels]
    for level in levels:
        check_noise(noise, level)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    if bn_mode == "reestimate" and bn_data is None:
        raise ValueError("bn_mode='reestimate' needs bn_data (training inputs)")
    bn_sets = []
    if bn_mode == "reestimate":
        bn_sets = [bn_data[i : i + batch_size] for i in range(0, len(bn_data), batch_size)]
        bn_sets = bn_sets[:bn_batches]
    result = RobustnessResult(
        settings={"noise": noise, "levels": levels, "draws": draws, "seed": seed,
                  "bn_mode": bn_mode, "include_bias": include_bias, "include_norm": include_norm,
                  "images": len(y)}
    )
    total = len(models) * sum(1 if lvl == 0 else draws for lvl in levels)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="weight-noise draws", unit="draw", file=sys.stderr)
    try:
        for name, model in models.items():
            was_training = model.training
            model.eval()
            tensors = [n for n, _ in noisy_parameters(model, include_bias, include_norm)]
            per_level: dict[float, list[float]] = {}
            try:
                for level in levels:
                    for draw in range(1 if level == 0 else draws):
                        draw_seed = pair_seed(seed, draw)
                        with perturbed_weights(model, noise=noise, level=level, seed=draw_seed,
                                               include_bias=include_bias,
                                               include_norm=include_norm):
                            if bn_mode == "reestimate" and level > 0:
                                _reestimate_bn(model, bn_sets)
                            acc, loss = evaluate(model, x, y, batch_size)
                        result.rows.append({"model": name, "noise": noise, "level": level,
                                            "draw": draw, "seed": draw_seed, "accuracy": acc,
                                            "loss": loss})
                        per_level.setdefault(level, []).append(acc)
                        if bar is not None:
                            bar.update(1)
            finally:
                model.train(was_training)
            result.summaries[name] = _summarize(per_level, levels, tensors, result.settings)
    finally:
        if bar is not None:
            bar.close()
    return result


def _summarize(per_level, levels, tensors, settings) -> dict[str, Any]:
    stats = {f"{lvl:g}": level_statistics(per_level[lvl]) for lvl in levels}
    means = [stats[f"{lvl:g}"]["mean"] for lvl in levels]
    clean = stats["0"]["mean"] if 0.0 in levels else None
    drops = drop_levels(levels, means, clean) if clean is not None else [None, None, None]
    return {
        "clean_accuracy": clean,
        "levels": stats,
        "drop_1pt": drops[0],
        "drop_5pt": drops[1],
        "drop_10pt": drops[2],
        "auc": area_under_curve(levels, means, normalize=True),
        "perturbed_tensors": tensors,
        **{k: settings[k] for k in ("noise", "draws", "seed", "bn_mode")},
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(result: RobustnessResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``robustness.csv``, ``summary.json`` and ``robustness.png`` atomically into out_dir."""
    out = Path(out_dir)
    buf = io.StringIO()
    fields = ["model", "noise", "level", "draw", "seed", "accuracy", "loss"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({**row, "accuracy": f"{row['accuracy']:.6f}", "loss": f"{row['loss']:.6f}"})
    paths = {"csv": out / "robustness.csv", "json": out / "summary.json",
             "png": out / "robustness.png"}
    _write_atomic(paths["csv"], buf.getvalue().encode())
    summary = {"settings": result.settings, "models": result.summaries}
    _write_atomic(paths["json"], json.dumps(summary, indent=2).encode())
    plot_robustness(result, paths["png"])
    return paths


def plot_robustness(result: RobustnessResult, path: str | Path) -> None:
    """Mean accuracy vs level per model, a band for the 5th–95th percentile of draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result.settings["levels"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, summary) in enumerate(result.summaries.items()):
        color = plt.cm.tab10(i % 10)
        accs = {lvl: [r["accuracy"] for r in result.rows
                      if r["model"] == name and r["level"] == lvl] for lvl in levels}
        mean = [100 * np.mean(accs[lvl]) for lvl in levels]
        low = [100 * np.percentile(accs[lvl], 5) for lvl in levels]
        high = [100 * np.percentile(accs[lvl], 95) for lvl in levels]
        ax.plot(levels, mean, "o-", color=color, label=name, markersize=3)
        ax.fill_between(levels, low, high, color=color, alpha=0.15)
        if summary["clean_accuracy"] is not None:
            ax.axhline(100 * summary["clean_accuracy"], color=color, ls=":", lw=0.8)
    noise = result.settings["noise"]
    ax.set_xlabel({"relative": "η (noise std / max|W| per layer)", "absolute": "σ (noise std)",
                   "multiplicative": "η (relative std per weight)"}[noise])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy under {noise} weight noise: mean, band = 5th–95th percentile of "
                 f"{result.settings['draws']} draws; dotted = clean", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())


def format_table(result: RobustnessResult) -> str:
    """A plain-text table: clean accuracy, mean accuracy per level, drop levels, AUC."""
    levels = [lvl for lvl in result.settings["levels"] if lvl != 0]
    head = ["model", "clean"] + [f"{lvl:g}" for lvl in levels] + ["-1pt", "-5pt", "-10pt", "AUC"]
    lines = [head]
    for name, s in result.summaries.items():
        clean = "-" if s["clean_accuracy"] is None else f"{100 * s['clean_accuracy']:.2f}"
        row = [name, clean] + [f"{100 * s['levels'][f'{lvl:g}']['mean']:.2f}" for lvl in levels]
        row += ["n/r" if d is None else f"{d:.3g}" for d in (s["drop_1pt"], s["drop_5pt"],
                                                            s["drop_10pt"])]
        row.append(f"{100 * s['auc']:.2f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def _parse_levels(text: str) -> list[float]:
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--levels must be comma-separated numbers, got {text!r}") from None
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise ValueError(f"--levels must be numbers >= 0, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    """``robusttrain robustness``: evaluate checkpoints under weight noise (see module docstring)."""
    parser = argparse.ArgumentParser(
        prog="robusttrain robustness",
        description="Accuracy of trained checkpoints under random perturbations of their weights.",
    )
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeatable)")
    parser.add_argument("--name", action="append", help="label of each checkpoint, in order")
    parser.add_argument("--noise", default="relative", help=f"one of {', '.join(NOISE_MODELS)}")
    parser.add_argument("--levels", default="0,0.02,0.05,0.1,0.2", help="comma-separated levels")
    parser.add_argument("--draws", type=int, default=50, help="draws per level (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the draws")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--data-dir", help="override the data_dir saved in the checkpoint")
    parser.add_argument("--batch-size", type=int, default=10000)
    parser.add_argument("--bn-mode", choices=BN_MODES, default="keep")
    parser.add_argument("--include-bias", action="store_true")
    parser.add_argument("--include-norm", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as err:  # CheckpointError, DatasetError and bad settings are ValueErrors
        print(f"robusttrain robustness: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from robusttrain.data import ImageDataModule
    from robusttrain.module import load_checkpoint

    levels = _parse_levels(args.levels)
    for level in levels:
        check_noise(args.noise, level)
    if args.draws < 1:
        raise ValueError(f"--draws must be >= 1, got {args.draws}")
    if args.name and len(args.name) != len(args.ckpt):
        raise ValueError(f"{len(args.name)} --name for {len(args.ckpt)} --ckpt; give one each")
    names = args.name or [_default_name(p) for p in args.ckpt]
    if len(set(names)) != len(names):
        raise ValueError(f"two checkpoints have the same name {names}; label them with --name")
    loaded = [load_checkpoint(p) for p in args.ckpt]
    data = {k: v for k, v in loaded[0].data.items() if k != "_class_path"}
    if not data:
        raise ValueError(f"{args.ckpt[0]} holds no data settings; it was not written by "
                         "`robusttrain fit`")
    for other, path in zip(loaded[1:], args.ckpt[1:]):
        if other.data.get("dataset") != data.get("dataset"):
            raise ValueError(f"{path} was trained on {other.data.get('dataset')}, "
                             f"{args.ckpt[0]} on {data.get('dataset')}; compare like with like")
    if args.data_dir:
        data["data_dir"] = args.data_dir
    dm = ImageDataModule(**data)
    dm.setup("fit" if args.split == "val" else "test")
    x, y = (dm.val_x, dm.val_y) if args.split == "val" else (dm.test_x, dm.test_y)
    device = torch.device(args.device)
    models = {n: c.backbone.to(device) for n, c in zip(names, loaded)}
    result = evaluate_models(
        models, x.to(device), y.to(device), noise=args.noise, levels=levels, draws=args.draws,
        seed=args.seed, batch_size=args.batch_size, bn_mode=args.bn_mode,
        bn_data=dm.train_x.to(device) if args.bn_mode == "reestimate" else None,
        include_bias=args.include_bias, include_norm=args.include_norm,
        progress=not args.no_progress,
    )
    paths = write_report(result, args.out)
    print(f"{args.noise} weight noise, {args.draws} draws per level, {args.split} split "
          f"({len(y)} images), BatchNorm statistics: {args.bn_mode}")
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _default_name(path: str) -> str:
    p = Path(path)
    # runs/<name>/version_k/checkpoints/last.ckpt -> <name>/version_k
    parts = p.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints":
        return f"{parts[-4]}/{parts[-3]}"
    return p.stem

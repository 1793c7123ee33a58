"""Train several methods on the same network, data and seeds; compare them under weight noise.

``robusttrain compare --config experiments/fashion_mlp.yaml`` reads one YAML file::

    name: fashion_mlp                    # results go to experiments/results/<name>/ (or --out)
    seeds: [0, 1, 2]
    trainer: {max_epochs: 3}             # the same budget for every method
    data: {class_path: robusttrain.data.FashionMNISTDataModule, init_args: {batch_size: 128}}
    backbone: {class_path: robusttrain.models.MLP, init_args: {hidden: [128]}}
    methods:
      sgd_momentum:
        model: {class_path: robusttrain.training.Classifier}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}
      zo_nesterov:
        model: {class_path: robusttrain.training.ZerothOrderClassifier, init_args: {num_pairs: 16}}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9, nesterov: true}}
        sigmas: [0.001, 0.01, 0.1]         # one run per smoothing scale
    robustness: {noise: relative, levels: [0, 0.05, 0.1, 0.2], draws: 50, seed: 0}

Every (method, σ, seed) is trained once with ``robusttrain fit`` semantics into
``<out>/runs/<method>[/sigma<σ>]/seed<k>/``; a run that finished (``result.json``) is reused and an
interrupted one resumes from its ``last.ckpt``, so an interrupted comparison picks up where it
stopped. All final checkpoints are then evaluated on the test split under the same weight-noise
draws (paired), and ``report.md``, ``robustness.csv``, ``summary.json``, ``robustness.png`` and
``frontier.png`` are written (atomically).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from robusttrain.files import write_atomic

__all__ = ["CompareConfig", "MethodSpec", "load_config", "run_comparison", "main"]

# Forward-pass equivalents per training step, the usual accounting: a backward pass costs about two
# forwards, so one backprop step is 3; a zeroth-order step is 2N perturbed forwards plus one clean
# forward (logged); noise injection is one backprop step at the perturbed point.
_BACKPROP_STEP_FORWARDS = 3


@dataclass
class MethodSpec:
    """One training method of a comparison (see the module docstring for the YAML form)."""

    name: str
    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    sigmas: list[float] | None = None

    def variants(self) -> list[float | None]:
        return list(self.sigmas) if self.sigmas else [None]


@dataclass
class CompareConfig:
    """A parsed comparison file."""

    name: str
    seeds: list[int]
    methods: list[MethodSpec]
    backbone: dict[str, Any]
    data: dict[str, Any]
    trainer: dict[str, Any] = field(default_factory=dict)
    robustness: dict[str, Any] = field(default_factory=dict)


class CompareConfigError(ValueError):
    """A comparison file with a missing or wrong entry; the message names it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CompareConfigError(message)


def load_config(path: str | Path) -> CompareConfig:
    """Read and check a comparison YAML file.

    Raises:
        CompareConfigError: a missing key, an empty method list, a non-positive sigma, ...
    """
    path = Path(path)
    _require(path.is_file(), f"comparison config {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    _require(isinstance(raw, dict), f"{path}: expected a mapping at the top level")
    for key in ("methods", "backbone", "data"):
        _require(key in raw, f"{path}: missing '{key}:' entry")
    seeds = raw.get("seeds", [0])
    _require(
        isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds),
        f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}",
    )
    _require(len(set(seeds)) == len(seeds), f"{path}: 'seeds' has duplicates: {seeds}")
    methods = []
    _require(
        isinstance(raw["methods"], dict) and raw["methods"],
        f"{path}: 'methods' must map method names to their settings",
    )
    for name, spec in raw["methods"].items():
        _require(isinstance(spec, dict) and "model" in spec, f"{path}: method {name!r} needs 'model:'")
        model = spec["model"]
        _require(
            isinstance(model, dict) and isinstance(model.get("class_path"), str),
            f"{path}: method {name!r}: 'model' needs a class_path",
        )
        sigmas = spec.get("sigmas")
        if sigmas is not None:
            _require(
                isinstance(sigmas, list)
                and sigmas
                and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sigmas),
                f"{path}: method {name!r}: 'sigmas' must be a list of positive numbers, got {sigmas!r}",
            )
        methods.append(
            MethodSpec(
                name=str(name),
                model=model,
                optimizer=spec.get("optimizer"),
                scheduler=spec.get("scheduler"),
                sigmas=[float(s) for s in sigmas] if sigmas else None,
            )
        )
    robustness = dict(raw.get("robustness") or {})
    _check_robustness(path, robustness)
    return CompareConfig(
        name=str(raw.get("name", path.stem)),
        seeds=seeds,
        methods=methods,
        backbone=raw["backbone"],
        data=raw["data"],
        trainer=dict(raw.get("trainer") or {}),
        robustness=robustness,
    )


ROBUSTNESS_DEFAULTS: dict[str, Any] = {
    "noise": "relative",
    "levels": [0.0, 0.02, 0.05, 0.1, 0.2],
    "draws": 50,
    "seed": 0,
    "max_images": None,
}


def _check_robustness(path: Path, rob: dict[str, Any]) -> None:
    unknown = set(rob) - set(ROBUSTNESS_DEFAULTS)
    _require(not unknown, f"{path}: unknown 'robustness' entries {sorted(unknown)}; "
             f"valid: {sorted(ROBUSTNESS_DEFAULTS)}")
    levels = rob.get("levels", ROBUSTNESS_DEFAULTS["levels"])
    _require(
        isinstance(levels, list) and levels
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in levels),
        f"{path}: robustness 'levels' must be a list of numbers >= 0, got {levels!r}",
    )
    draws = rob.get("draws", ROBUSTNESS_DEFAULTS["draws"])
    _require(isinstance(draws, int) and draws >= 1,
             f"{path}: robustness 'draws' must be an integer >= 1, got {draws!r}")
    max_images = rob.get("max_images")
    _require(max_images is None or (isinstance(max_images, int) and max_images >= 1),
             f"{path}: robustness 'max_images' must be null or an integer >= 1, got {max_images!r}")


def _label(method: MethodSpec, sigma: float | None) -> str:
    return method.name if sigma is None else f"{method.name} σ={sigma:g}"


def _run_dir(out: Path, method: MethodSpec, sigma: float | None, seed: int) -> Path:
    sub = Path(method.name) if sigma is None else Path(method.name) / f"sigma{sigma:g}"
    return out / "runs" / sub / f"seed{seed}"


def _fit_args(
    cfg: CompareConfig, method: MethodSpec, sigma: float | None, seed: int, run_dir: Path
) -> dict[str, Any]:
    """The LightningCLI ``fit`` configuration of one run, as a plain dict."""
    init_args = copy.deepcopy(method.model.get("init_args") or {})
    init_args["backbone"] = copy.deepcopy(cfg.backbone)
    if method.optimizer is not None:
        init_args["optimizer"] = copy.deepcopy(method.optimizer)
    if method.scheduler is not None:
        init_args["scheduler"] = copy.deepcopy(method.scheduler)
    if sigma is not None:
        init_args["sigma"] = sigma
    if "seed" in _init_parameters(method.model["class_path"]):
        init_args["seed"] = seed
    trainer = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **copy.deepcopy(cfg.trainer),
        "default_root_dir": str(run_dir),
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
        },
    }
    fit: dict[str, Any] = {
        "seed_everything": seed,
        "trainer": trainer,
        "model": {"class_path": method.model["class_path"], "init_args": init_args},
        "data": copy.deepcopy(cfg.data),
        "checkpoint": {"dirpath": str(run_dir / "checkpoints")},
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        fit["ckpt_path"] = str(last)
    return fit


def _init_parameters(class_path: str) -> set[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return set(inspect.signature(cls.__init__).parameters)


def train_run(
    cfg: CompareConfig, method: MethodSpec, sigma: float | None, seed: int, out: Path
) -> dict[str, Any]:
    """Train one (method, σ, seed) unless its ``result.json`` exists; return that result."""
    from robusttrain.training.lightning_cli import make_cli

    run_dir = _run_dir(out, method, sigma, seed)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_path = run_dir / "wall_time.json"
    earlier = json.loads(progress_path.read_text())["seconds"] if progress_path.is_file() else 0.0
    args = _fit_args(cfg, method, sigma, seed, run_dir)
    resumed = "ckpt_path" in args
    print(f"[compare] {'resuming' if resumed else 'training'} {_label(method, sigma)} seed {seed}")
    start = time.perf_counter()
    ckpt_path = args.pop("ckpt_path", None)
    config_path = run_dir / "fit_config.yaml"
    write_atomic(config_path, yaml.safe_dump(args, sort_keys=False))
    try:
        cli = make_cli(["--config", str(config_path)], run=False)
        trainer, model = cli.trainer, cli.model
        trainer.fit(model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    finally:
        elapsed = earlier + time.perf_counter() - start
        write_atomic(progress_path, json.dumps({"seconds": elapsed}))
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise RuntimeError(f"training {_label(method, sigma)} seed {seed} wrote no {last}")
    steps = int(trainer.global_step)
    forwards = getattr(model, "_forward_passes", None)
    if forwards is None:
        forwards = steps * _BACKPROP_STEP_FORWARDS
    result = {
        "method": method.name,
        "sigma": sigma,
        "seed": seed,
        "class_path": method.model["class_path"],
        "wall_time_s": round(elapsed, 2),
        "steps": steps,
        "forward_equivalents": int(forwards),
        "checkpoint": str(last.relative_to(out)),
    }
    write_atomic(result_path, json.dumps(result, indent=2))
    return result


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not reached"
    return f"{value:.{digits}f}"


def run_comparison(
    cfg: CompareConfig, out: Path, device: str = "cpu", command: str | None = None
) -> Path:
    """Train every run that is missing, evaluate all under shared noise draws, write the report.

    Returns:
        The path of ``report.md``.
    """
    from robusttrain.evaluation import evaluate_models, write_report
    from robusttrain.training.checkpoints import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for method in cfg.methods:
        for sigma in method.variants():
            for seed in cfg.seeds:
                results.append(train_run(cfg, method, sigma, seed, out))

    rob = {**ROBUSTNESS_DEFAULTS, **cfg.robustness}
    # the clean accuracy (level 0) is what the drops are measured from
    rob["levels"] = sorted({0.0, *(float(v) for v in rob["levels"])})
    models = {}
    for r in results:
        loaded = load_checkpoint(out / r["checkpoint"])
        key = f"{_label_of(r)} seed{r['seed']}"
        models[key] = loaded.backbone.to(device)
        r["key"] = key
        r["max_abs_weight"] = _mean_layer_max_abs(loaded.backbone)
    dm_cls = _data_class(cfg.data)
    dm = dm_cls(**{k: v for k, v in (cfg.data.get("init_args") or {}).items()})
    dm.setup("test")
    x, y = dm.test_x, dm.test_y
    if rob["max_images"] is not None:
        x, y = x[: rob["max_images"]], y[: rob["max_images"]]
    x, y = x.to(device), y.to(device)
    result = evaluate_models(
        models,
        x,
        y,
        noise=rob["noise"],
        levels=rob["levels"],
        draws=int(rob["draws"]),
        seed=int(rob["seed"]),
        progress=True,
    )
    write_report(result, out)
    rows = _read_rows(out / "robustness.csv")
    levels = rob["levels"]
    entries = summarize_runs(results, rows, levels)
    write_atomic(out / "comparison.json", json.dumps(entries, indent=2))
    command = command or f"robusttrain compare --config <{cfg.name}.yaml>"
    report = _render_report(cfg, entries, rob, time.perf_counter() - started, command)
    write_atomic(out / "report.md", report)
    _plot_frontier(entries, levels, out / "frontier.png")
    return out / "report.md"


def _label_of(r: dict[str, Any]) -> str:
    return r["method"] if r["sigma"] is None else f"{r['method']} σ={r['sigma']:g}"


def _data_class(data: dict[str, Any]) -> type:
    import importlib

    module, _, name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def _mean_layer_max_abs(model: torch.nn.Module) -> float:
    """Mean over Linear/Conv weight tensors of max|W| (relates absolute σ to relative η)."""
    values = [
        m.weight.detach().abs().max().item()
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    return float(np.mean(values))


def _read_rows(csv_path: Path) -> list[dict[str, Any]]:
    import csv

    with csv_path.open(newline="") as f:
        return [
            {**row, "level": float(row["level"]), "accuracy": float(row["accuracy"])}
            for row in csv.DictReader(f)
        ]


def summarize_runs(
    results: list[dict[str, Any]], rows: list[dict[str, Any]], levels: list[float]
) -> list[dict[str, Any]]:
    """Aggregate the per-draw rows of the robustness CSV into one entry per (method, σ).

    Per seed, accuracy at a level is the mean over its draws; the entry holds, per level, the mean
    and standard deviation of that over seeds, the drop levels (1/5/10 points below the clean
    accuracy) and normalized area of the seed-averaged curve, and the mean wall time and
    forward-pass equivalents per run.
    """
    from robusttrain.evaluation import area_under_curve, drop_levels

    by_model: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {}).setdefault(row["level"], []).append(row["accuracy"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_label_of(r), []).append(r)
    entries = []
    for label, runs in groups.items():
        per_seed = np.array(
            [[np.mean(by_model[r["key"]][lvl]) for lvl in levels] for r in runs]
        )  # (seeds, levels)
        curve = per_seed.mean(axis=0)
        clean_per_seed = per_seed[:, levels.index(0.0)] if 0.0 in levels else per_seed[:, 0]
        clean = float(clean_per_seed.mean())
        entries.append(
            {
                "label": label,
                "method": runs[0]["method"],
                "sigma": runs[0]["sigma"],
                "seeds": [r["seed"] for r in runs],
                "clean_mean": clean,
                "clean_std": float(clean_per_seed.std(ddof=1)) if len(runs) > 1 else 0.0,
                "level_mean": curve.tolist(),
                "level_std": (per_seed.std(axis=0, ddof=1) if len(runs) > 1
                              else np.zeros(len(levels))).tolist(),
                "drops": drop_levels(levels, curve.tolist(), clean, drops=(0.01, 0.05, 0.10)),
                "auc": area_under_curve(levels, curve.tolist(), normalize=True),
                "wall_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
                "forward_equivalents": float(np.mean([r["forward_equivalents"] for r in runs])),
                "steps": int(np.mean([r["steps"] for r in runs])),
                "max_abs_weight": float(np.mean([r["max_abs_weight"] for r in runs])),
            }
        )
    return entries


def _pct(mean: float, std: float | None = None) -> str:
    if std is None or std == 0.0:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _render_report(
    cfg: CompareConfig,
    entries: list[dict[str, Any]],
    rob: dict[str, Any],
    elapsed: float,
    command: str,
) -> str:
    levels = [float(v) for v in rob["levels"]]
    data = cfg.data["class_path"].rsplit(".", 1)[-1]
    backbone = cfg.backbone["class_path"].rsplit(".", 1)[-1]
    lines = [
        f"# Comparison `{cfg.name}`",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- Data: {data} (accuracy on the test split), backbone: {backbone} "
        f"`{json.dumps(cfg.backbone.get('init_args', {}))}`",
        f"- Training budget, the same for every method: `{json.dumps(cfg.trainer)}`; "
        f"seeds {cfg.seeds}",
        f"- Weight noise: `{rob['noise']}`, levels {levels}, {rob['draws']} draws per level "
        f"(seed {rob['seed']}); every model sees the same draws (paired). "
        "BatchNorm: running statistics from training kept.",
        f"- Wall time of this comparison (training that was not already done, plus evaluation): "
        f"{elapsed / 60:.1f} min",
        "",
        "Accuracy in %, mean ± standard deviation over seeds (each seed's value is the mean over "
        "its draws). Drop columns: the noise level at which mean accuracy falls 1, 5 and 10 points "
        "below the clean accuracy (linear interpolation). AUC: area under the accuracy-vs-level "
        "curve divided by the level range (an average accuracy). Forward-pass equivalents per run: "
        "a backprop step counts 3, a zeroth-order step 2N + 1.",
        "",
    ]
    level_cols = [f"η={lvl:g}" for lvl in levels if lvl != 0.0]
    header = ["method", "σ", "clean", *level_cols, "1-pt drop", "5-pt drop", "10-pt drop", "AUC",
              "wall time / run", "forward equiv. / run"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for e in entries:
        cells = [e["method"], "—" if e["sigma"] is None else f"{e['sigma']:g}",
                 _pct(e["clean_mean"], e["clean_std"])]
        for i, lvl in enumerate(levels):
            if lvl != 0.0:
                cells.append(_pct(e["level_mean"][i], e["level_std"][i]))
        cells += [_fmt(d, 3) for d in e["drops"]]
        cells += [f"{100 * e['auc']:.2f}", f"{e['wall_time_s']:.0f} s",
                  f"{e['forward_equivalents']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Units of σ and η",
        "",
        "Training smooths with an *absolute* σ: every weight gets σ·g. The evaluation uses "
        f"`{rob['noise']}` noise"
        + (
            ", w + η·max|W_layer|·ε, so a training σ corresponds to η ≈ σ / max|W_layer|. "
            "Mean max|W| over the Linear/Conv layers of the trained models, and that equivalent η:"
            if rob["noise"] == "relative"
            else "."
        ),
        "",
        r"| method | σ | mean max\|W\| | σ as η |",
        "|---|---|---|---|",
    ]
    for e in entries:
        if e["sigma"] is not None:
            lines.append(
                f"| {e['method']} | {e['sigma']:g} | {e['max_abs_weight']:.3f} | "
                f"{e['sigma'] / e['max_abs_weight']:.3g} |"
            )
    lines += [
        "",
        "Files: `robustness.csv` (every model, level and draw), `summary.json` (per-model "
        "statistics), `robustness.png` (accuracy vs level), `frontier.png` (clean accuracy against "
        "accuracy under noise, one point per method and σ), `runs/` (checkpoints, logs, configs).",
        "",
    ]
    return "\n".join(lines)


def _plot_frontier(entries: list[dict[str, Any]], levels: list[float], path: Path) -> None:
    """Clean accuracy (x) against accuracy under noise (y), one point per (method, σ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [lvl for lvl in (0.1, 0.2) if lvl in levels] or [max(levels)]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.5), squeeze=False)
    methods = sorted({e["method"] for e in entries})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, lvl in zip(axes[0], targets):
        i = levels.index(lvl)
        for e in entries:
            ax.errorbar(
                100 * e["clean_mean"], 100 * e["level_mean"][i],
                xerr=100 * e["clean_std"], yerr=100 * e["level_std"][i],
                fmt="o", color=colors[e["method"]], capsize=3,
            )
            ax.annotate(
                e["method"] if e["sigma"] is None else f"{e['method']} σ={e['sigma']:g}",
                (100 * e["clean_mean"], 100 * e["level_mean"][i]),
                textcoords="offset points", xytext=(4, 4), fontsize=7,
            )
        ax.set_xlabel("clean test accuracy (%)")
        ax.set_ylabel(f"mean accuracy at η = {lvl:g} (%)")
        ax.set_title(f"robustness frontier, η = {lvl:g}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    """``robusttrain compare --config FILE [--out DIR] [--device cpu|cuda]``."""
    parser = argparse.ArgumentParser(
        prog="robusttrain compare",
        description="Train several methods and compare their accuracy under weight noise.",
    )
    parser.add_argument("--config", required=True, help="comparison YAML file")
    parser.add_argument("--out", help="output folder (default experiments/results/<name>)")
    parser.add_argument("--device", default="cpu", help="device for the robustness evaluation")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except CompareConfigError as err:
        print(f"robusttrain compare: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("experiments/results") / cfg.name
    command = f"robusttrain compare --config {args.config}" + (f" --out {args.out}" if args.out else "")
    report = run_comparison(cfg, out, device=args.device, command=command)
    print(report.read_text())
    return 0

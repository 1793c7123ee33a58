"""Running a comparison: train every (method, variant, seed), evaluate all under weight noise, report.

Every (method, variant, seed) is trained once with ``robusttrain fit`` semantics into
``<out>/runs/<method>[/sigma<σ> | /level<η>]/seed<k>/``; a run that finished (``result.json``) is
reused and an interrupted one resumes from its ``last.ckpt``, so an interrupted comparison picks up
where it stopped. A run folder holds ``fit_config.yaml``, ``checkpoints/{best,last}.ckpt``,
``logs/version_<k>/metrics.csv`` (one version per start) and ``result.json``, which records
``sigma``, ``level`` and the method's training ``noise`` (None where not used; files without
``level``/``noise``, from before, are read as None).

All final checkpoints are then evaluated on the test split under the same weight-noise draws
(paired) for each evaluation noise model, one model at a time; each model's evaluation is kept in
``<run>/evaluations/robustness_<noise>.json`` as soon as it is done and reused by a later call
while its checkpoint, the test data and the settings are unchanged
(:mod:`~robusttrain.comparison.evaluation_cache`). The results are written atomically: per noise
model ``robustness.csv``, ``summary.json``, ``robustness.png`` and ``frontier.png`` — in ``<out>/``
when ``robustness.noise`` is a string, in ``<out>/<noise>/`` when it is a list — then
``comparison.json`` (a list of entries, or noise model -> list for a list of noise models) and
``report.md``.
"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from robusttrain.comparison.config import CompareConfig, MethodSpec, Variant, init_parameters
from robusttrain.comparison.evaluation_cache import (
    file_digest,
    kept_or_evaluate,
    kept_path,
    tensor_digest,
)
from robusttrain.comparison.report import (
    plot_frontier,
    plot_robustness,
    render_report,
    run_label,
    summarize_runs,
)
from robusttrain.evaluation import RobustnessResult, evaluate_models, write_report
from robusttrain.files import write_atomic
from robusttrain.training.checkpoints import (
    LoadedCheckpoint,
    check_checkpoint_file,
    load_checkpoint,
)
from robusttrain.training.lightning_cli import make_cli

__all__ = ["load_run_checkpoint", "run_comparison", "train_run"]

# Forward-pass equivalents per training step, the usual accounting: a backward pass costs about two
# forwards, so one backprop step is 3; a zeroth-order step is 2N perturbed forwards plus one clean
# forward (logged); noise injection is one backprop step at the perturbed point.
_BACKPROP_STEP_FORWARDS = 3


def _run_dir(out: Path, method: MethodSpec, variant: Variant, seed: int) -> Path:
    sub = variant.subdir()
    folder = Path(method.name) if sub is None else Path(method.name) / sub
    return out / "runs" / folder / f"seed{seed}"


def _fit_args(
    cfg: CompareConfig, method: MethodSpec, variant: Variant, seed: int, run_dir: Path
) -> dict[str, Any]:
    """The LightningCLI ``fit`` configuration of one run, as a plain dict."""
    init_args = copy.deepcopy(method.model.get("init_args") or {})
    init_args["backbone"] = copy.deepcopy(cfg.backbone)
    if method.optimizer is not None:
        init_args["optimizer"] = copy.deepcopy(method.optimizer)
    if method.scheduler is not None:
        init_args["scheduler"] = copy.deepcopy(method.scheduler)
    if variant.sigma is not None:
        init_args["sigma"] = variant.sigma
    if variant.level is not None:
        init_args["level"] = variant.level
    if "seed" in init_parameters(method.model["class_path"]):
        init_args["seed"] = seed
    trainer = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **copy.deepcopy(cfg.trainer),
        "default_root_dir": str(run_dir),
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            # logs/version_<k>/ per (re)start: the run folder already holds fit_config.yaml (a
            # CSVLogger pointed at it would warn and delete the metrics of an interrupted start)
            "init_args": {"save_dir": str(run_dir), "name": "logs"},
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


def train_run(
    cfg: CompareConfig, method: MethodSpec, variant: Variant | None, seed: int, out: Path
) -> dict[str, Any]:
    """Train one (method, variant, seed) unless its ``result.json`` exists; return that result.

    ``variant`` None stands for ``Variant()``, a method without a σ or η grid.
    """
    variant = variant or Variant()
    label = variant.label(method.name)
    run_dir = _run_dir(out, method, variant, seed)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    progress_path = run_dir / "wall_time.json"
    earlier = json.loads(progress_path.read_text())["seconds"] if progress_path.is_file() else 0.0
    args = _fit_args(cfg, method, variant, seed, run_dir)
    resumed = "ckpt_path" in args
    if resumed:
        check_checkpoint_file(args["ckpt_path"], advice=_resume_advice)
    print(f"[compare] {'resuming' if resumed else 'training'} {label} seed {seed}")
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
        raise RuntimeError(f"training {label} seed {seed} wrote no {last}")
    steps = int(trainer.global_step)
    forwards = getattr(model, "_forward_passes", None)
    if forwards is None:
        forwards = steps * _BACKPROP_STEP_FORWARDS
    result = {
        "method": method.name,
        "sigma": variant.sigma,
        "level": variant.level,
        "noise": method.noise,
        "seed": seed,
        "class_path": method.model["class_path"],
        "wall_time_s": round(elapsed, 2),
        "steps": steps,
        "forward_equivalents": int(forwards),
        "checkpoint": str(last.relative_to(out)),
    }
    write_atomic(result_path, json.dumps(result, indent=2))
    return result


def _resume_advice(sibling: Path | None) -> str:
    advice = "delete it and run compare again to train that run from the start"
    if sibling is not None:
        advice += f", or copy {sibling.name} beside it over it to resume from the step it holds"
    return advice


def load_run_checkpoint(path: Path) -> LoadedCheckpoint:
    """The final checkpoint of a trained run (``<run>/checkpoints/last.ckpt``).

    Raises:
        CheckpointError: the file is damaged; the message says to delete the run folder, so that
            the next compare trains that run again.
    """
    run_dir = path.parent.parent
    return load_checkpoint(path, advice=lambda _: f"delete the run folder {run_dir} and run "
                                                  "compare again to train that run again")


def run_comparison(
    cfg: CompareConfig, out: Path, device: str = "cpu", command: str | None = None
) -> Path:
    """Train every run that is missing, evaluate all under shared noise draws, write the report.

    Returns:
        The path of ``report.md``.
    """
    spec = cfg.robustness_spec()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for method in cfg.methods:
        for variant in method.variants():
            for seed in cfg.seeds:
                r = train_run(cfg, method, variant, seed, out)
                # result files written before training levels existed have no level/noise
                r.setdefault("level", None)
                r.setdefault("noise", method.noise)
                results.append(r)

    models = {}
    for r in results:
        loaded = load_run_checkpoint(out / r["checkpoint"])
        key = f"{run_label(r)} seed{r['seed']}"
        models[key] = loaded.backbone.to(device)
        r["key"] = key
        r["max_abs_weight"] = _mean_layer_max_abs(loaded.backbone)
        r["weight_crest"] = _mean_layer_crest(loaded.backbone)
    dm_cls = _data_class(cfg.data)
    dm = dm_cls(**{k: v for k, v in (cfg.data.get("init_args") or {}).items()})
    dm.setup("test")
    x, y = dm.test_x, dm.test_y
    if spec.max_images is not None:
        x, y = x[: spec.max_images], y[: spec.max_images]
    data_digest = tensor_digest(x, y)
    x, y = x.to(device), y.to(device)
    entries: dict[str, list[dict[str, Any]]] = {}
    for noise, levels in spec.levels.items():
        folder = spec.out_dir(out, noise)
        # the same seed for every noise model: draw k is the same ε for all (paired)
        result = _evaluate_runs(results, models, x, y, out, data_digest, noise=noise,
                                levels=levels, draws=spec.draws, seed=spec.seed)
        write_report(result, folder)
        entries[noise] = summarize_runs(results, _read_rows(folder / "robustness.csv"), levels)
        # replaces write_report's per-model plot with one curve per (method, variant)
        plot_robustness(entries[noise], levels, noise, folder / "robustness.png", draws=spec.draws)
        plot_frontier(entries[noise], levels, folder / "frontier.png", noise=noise)
    saved = entries if spec.per_noise_folders else entries[spec.primary]
    write_atomic(out / "comparison.json", json.dumps(saved, indent=2, ensure_ascii=False))
    command = command or f"robusttrain compare --config <{cfg.name}.yaml>"
    report = render_report(cfg, entries, time.perf_counter() - started, command)
    write_atomic(out / "report.md", report)
    return out / "report.md"


def _evaluate_runs(
    results: list[dict[str, Any]], models: dict[str, torch.nn.Module], x: torch.Tensor,
    y: torch.Tensor, out: Path, data_digest: str, **settings: Any,
) -> RobustnessResult:
    """:func:`evaluate_models` of every run's model, one model at a time, each kept in its run
    folder (:mod:`~robusttrain.comparison.evaluation_cache`) and reused while its key holds.

    The result equals one :func:`evaluate_models` call over all the models: each model's rows and
    summary depend on that model alone (the draws are paired through their seeds).

    Args:
        results: the runs (``key``: model name, ``checkpoint``: relative to ``out``).
        models: model name -> the loaded backbone.
        x, y: the evaluation inputs and labels; ``data_digest`` their :func:`tensor_digest`.
        out: the comparison folder.
        settings: the arguments of :func:`evaluate_models` (noise, levels, draws, seed).
    """
    merged = RobustnessResult()
    for r in results:
        name, checkpoint = r["key"], out / r["checkpoint"]
        path = kept_path(checkpoint.parent.parent, "robustness", settings["noise"])
        key = {"evaluation": "robustness", "model": name,
               "checkpoint_sha256": file_digest(checkpoint), "data_sha256": data_digest,
               **settings}

        def evaluate(name: str = name) -> dict[str, Any]:
            one = evaluate_models({name: models[name]}, x, y, progress=True, **settings)
            return {"settings": one.settings, "rows": one.rows, "summary": one.summaries[name]}

        value = kept_or_evaluate(
            path, key, evaluate,
            evaluating=f"evaluating {name} under {settings['noise']} noise",
            reusing=(f"reusing the {settings['noise']}-noise evaluation of {name} "
                     f"({path.relative_to(out)})"))
        merged.settings = value["settings"]
        merged.rows.extend(value["rows"])
        merged.summaries[name] = value["summary"]
    return merged


def _data_class(data: dict[str, Any]) -> type:
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


def _mean_layer_crest(model: torch.nn.Module) -> float:
    """Mean over Linear/Conv weight tensors of max|W| / rms(W), the spread of the weights.

    Relative noise gives every weight of a tensor the standard deviation η·max|W|, so the noise
    on a typical weight, relative to its size, is η·max|W|/rms(W): a tensor whose weights are all
    of similar size (small ratio) loses less to the same η than one with a few large weights.
    """
    values = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach().float()
            rms = w.pow(2).mean().sqrt().item()
            if rms > 0:
                values.append(w.abs().max().item() / rms)
    return float(np.mean(values)) if values else float("nan")


def _read_rows(csv_path: Path) -> list[dict[str, Any]]:
    with csv_path.open(newline="") as f:
        return [
            {**row, "level": float(row["level"]), "accuracy": float(row["accuracy"])}
            for row in csv.DictReader(f)
        ]

"""Comparison of training methods for a deployment: quantized, faulty, noisy hardware.

``robusttrain compare --config experiments/deployment_fashion_mlp.yaml`` reads a file with a
``deployments:`` block (a comparison file without one is the weight-noise comparison of
:mod:`robusttrain.comparison.config`)::

    name: deployment_fashion_mlp
    seeds: [0, 1, 2]
    trainer: {max_epochs: 10}          # the default budget of a run
    data: {class_path: robusttrain.data.FashionMNISTDataModule, init_args: {batch_size: 256}}
    backbone: {class_path: robusttrain.models.MLP, init_args: {hidden: [128]}}
    deployments:                        # the targets: name -> preset, YAML file or list of steps
      int2: [{kind: quantize, bits: 2, per_channel: true, clip: 2.5}]
      int2_noisy: [{kind: quantize, bits: 2, per_channel: true, clip: 2.5},
                   {kind: read_noise, noise: relative, level: 0.05}]
    methods:
      sgd:                              # float training: evaluated through every target (PTQ)
        model: {class_path: robusttrain.training.Classifier}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
      qat:                              # trained through the quantizer of each target
        model: {class_path: robusttrain.training.QuantizationAwareClassifier}
        train_through: {int2: int2, int2_noisy: int2}
        init_from: sgd                  # starts from the sgd model of the same seed
        trainer: {max_epochs: 3}
      zo:                               # trained through each target itself
        model: {class_path: robusttrain.training.ZerothOrderClassifier}
        train_through: target
    evaluation: {device_draws: 5, inference_draws: 5, seed: 0}

``train_through`` says which model of a method stands for which target: absent or ``null``, one
float model per seed for every target; ``target``, one model per target trained through that
target; a mapping ``target: deployment``, the model trained through that deployment (one of
``deployments``) for the targets listed, and only those. The trained deployment goes into the
model's ``deployment`` argument. ``init_from: <method>`` starts each run from the final
checkpoint of that method's run of the same seed (a float method, listed earlier); the report
counts the cost of both. ``trainer``, ``optimizer`` and ``scheduler`` of a method replace the
file's defaults.

Every run is trained with :func:`robusttrain.comparison.runner.train_run` into
``<out>/runs/<method>/<deployment or float>/seed<k>/`` (finished runs are reused, interrupted
ones resume). Each target is then evaluated with :func:`robusttrain.evaluation.evaluate_deployment`
on the test split, every model on the same chips and read-noise draws (paired), one model at a
time: each model's evaluation through a target is kept in
``<run>/evaluations/deployment_<target>.json`` as soon as it is done and reused by a later call
while its checkpoint, the test data, the target and the draws are unchanged
(:mod:`~robusttrain.comparison.evaluation_cache`). The results are written atomically:
``deployment.csv`` (one row per model, target, chip and inference run), ``comparison.json`` (per
method and target: per-seed means, mean and std over seeds, costs),
``deployment.png`` (grouped bars) and ``report.md``.
"""

from __future__ import annotations

import copy
import csv
import importlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from robusttrain.comparison.config import CompareConfig, CompareConfigError, MethodSpec
from robusttrain.comparison.evaluation_cache import (
    file_digest,
    kept_or_evaluate,
    kept_path,
    tensor_digest,
)
from robusttrain.comparison.runner import load_run_checkpoint, train_run
from robusttrain.evaluation.deployment import evaluate_deployment
from robusttrain.evaluation.report import save_figure
from robusttrain.files import write_atomic
from robusttrain.noise.deployment import Deployment, parse_deployment

if TYPE_CHECKING:
    from matplotlib.artist import Artist

__all__ = [
    "DeploymentCompareConfig",
    "DeploymentMethod",
    "is_deployment_config",
    "load_deployment_config",
    "run_deployment_comparison",
]

EVALUATION_DEFAULTS = {"device_draws": 5, "inference_draws": 5, "seed": 0, "max_images": None}
FLOAT = "float"


@dataclass
class DeploymentMethod:
    """One method: its model, optimizer, budget, and which trained model stands for which target."""

    name: str
    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    through: dict[str, str | None] = field(default_factory=dict)  # target -> trained deployment
    init_from: str | None = None

    def trained_deployments(self) -> list[str | None]:
        """The distinct deployments this method trains through (``None``: float), in order."""
        return list(dict.fromkeys(self.through.values()))


@dataclass
class DeploymentCompareConfig:
    """A parsed deployment comparison file."""

    name: str
    seeds: list[int]
    data: dict[str, Any]
    backbone: dict[str, Any]
    deployments: dict[str, Deployment]
    methods: list[DeploymentMethod]
    trainer: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=lambda: dict(EVALUATION_DEFAULTS))


def is_deployment_config(path: str | Path) -> bool:
    """Whether the comparison file at ``path`` has a ``deployments:`` block."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "deployments" in raw


def _require(cond: object, message: str) -> None:
    # cond is tested for truth: a non-empty list or mapping passes
    if not cond:
        raise CompareConfigError(message)


def load_deployment_config(path: str | Path) -> DeploymentCompareConfig:
    """Read and check a deployment comparison file (see the module docstring).

    Raises:
        CompareConfigError: a missing or wrong entry; the message names it and the fix.
    """
    path = Path(path)
    _require(path.is_file(), f"comparison file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CompareConfigError(f"{path} is not valid YAML: {err}") from None
    _require(isinstance(raw, dict), f"{path}: expected a mapping at the top level")
    known = {"name", "seeds", "trainer", "data", "backbone", "deployments", "methods", "evaluation"}
    unknown = sorted(set(raw) - known)
    _require(not unknown, f"{path}: unknown entries {', '.join(unknown)}; a deployment "
             f"comparison takes {', '.join(sorted(known))}")
    for key in ("name", "seeds", "data", "backbone", "deployments", "methods"):
        _require(key in raw, f"{path}: missing '{key}:'")
    seeds = raw["seeds"]
    _require(isinstance(seeds, list) and seeds and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        and len(set(seeds)) == len(seeds), f"{path}: 'seeds' must be a list of distinct integers >= 0")
    _require(isinstance(raw["deployments"], dict) and raw["deployments"],
             f"{path}: 'deployments' must map names to deployments (preset, YAML file or steps)")
    deployments = {}
    for name, spec in raw["deployments"].items():
        try:
            dep = parse_deployment(spec)
        except ValueError as err:
            raise CompareConfigError(f"{path}: deployment {name!r}: {err}") from None
        deployments[str(name)] = Deployment(dep.steps, str(name))
    _require(isinstance(raw["methods"], dict) and raw["methods"],
             f"{path}: 'methods' must map method names to settings")
    methods: list[DeploymentMethod] = []
    for name, spec in raw["methods"].items():
        methods.append(_method(path, str(name), spec, deployments, methods))
    evaluation = dict(EVALUATION_DEFAULTS)
    given = raw.get("evaluation") or {}
    _require(isinstance(given, dict) and not set(given) - set(EVALUATION_DEFAULTS),
             f"{path}: 'evaluation' takes {', '.join(EVALUATION_DEFAULTS)}")
    evaluation.update(given)
    for key in ("device_draws", "inference_draws"):
        value = evaluation[key]
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{path}: evaluation.{key} must be an integer >= 1, got {value!r}")
    trainer = raw.get("trainer") or {}
    _require(isinstance(trainer, dict), f"{path}: 'trainer' must be a mapping")
    return DeploymentCompareConfig(
        name=str(raw["name"]), seeds=list(seeds), data=raw["data"], backbone=raw["backbone"],
        deployments=deployments, methods=methods, trainer=trainer, evaluation=evaluation,
    )


def _method(
    path: Path, name: str, spec: Any, deployments: dict[str, Deployment],
    earlier: list[DeploymentMethod],
) -> DeploymentMethod:
    where = f"{path}: method {name!r}"
    _require(isinstance(spec, dict) and isinstance((spec.get("model") or {}).get("class_path"), str),
             f"{where} needs 'model: {{class_path: ...}}'")
    known = {"model", "optimizer", "scheduler", "trainer", "train_through", "init_from"}
    unknown = sorted(set(spec) - known)
    _require(not unknown, f"{where}: unknown entries {', '.join(unknown)}; a method takes "
             f"{', '.join(sorted(known))}")
    init_args = spec["model"].get("init_args") or {}
    _require("deployment" not in init_args and "init_from" not in init_args,
             f"{where}: set the deployment with 'train_through' and the start with 'init_from', "
             "not in model.init_args")
    through_spec = spec.get("train_through")
    if through_spec is None:
        through: dict[str, str | None] = {target: None for target in deployments}
    elif through_spec == "target":
        through = {target: target for target in deployments}
    else:
        _require(isinstance(through_spec, dict) and through_spec,
                 f"{where}: train_through must be null, 'target' or a mapping target -> deployment")
        through = {}
        for target, dep in through_spec.items():
            for what in (target, dep):
                _require(what in deployments, f"{where}: train_through names {what!r}, which is "
                         f"not in deployments ({', '.join(deployments)})")
            through[str(target)] = str(dep)
    init_from = spec.get("init_from")
    if init_from is not None:
        source = next((m for m in earlier if m.name == init_from), None)
        if source is None:
            raise CompareConfigError(f"{where}: init_from {init_from!r} must name a method listed "
                                     "before it")
        _require(source.trained_deployments() == [None], f"{where}: init_from {init_from!r} must "
                 "be a float method (no train_through): one checkpoint per seed")
    trainer = spec.get("trainer") or {}
    _require(isinstance(trainer, dict), f"{where}: 'trainer' must be a mapping")
    return DeploymentMethod(name=name, model=spec["model"], optimizer=spec.get("optimizer"),
                            scheduler=spec.get("scheduler"), trainer=trainer, through=through,
                            init_from=init_from)


def _run_spec(
    cfg: DeploymentCompareConfig, method: DeploymentMethod, trained: str | None,
    init_checkpoint: Path | None,
) -> tuple[CompareConfig, MethodSpec]:
    model = copy.deepcopy(method.model)
    init_args = model.setdefault("init_args", {}) or {}
    model["init_args"] = init_args
    if trained is not None:
        init_args["deployment"] = cfg.deployments[trained].to_list()
    if init_checkpoint is not None:
        init_args["init_from"] = str(init_checkpoint)
    spec = MethodSpec(name=f"{method.name}/{trained or FLOAT}", model=model,
                      optimizer=method.optimizer, scheduler=method.scheduler)
    run_cfg = CompareConfig(name=cfg.name, seeds=cfg.seeds, methods=[spec], backbone=cfg.backbone,
                            data=cfg.data, trainer={**cfg.trainer, **method.trainer})
    return run_cfg, spec


def train_all(cfg: DeploymentCompareConfig, out: Path) -> dict[tuple[str, str | None, int], dict]:
    """Train every (method, trained deployment, seed) that is missing; return their results."""
    results: dict[tuple[str, str | None, int], dict] = {}
    for method in cfg.methods:
        for trained in method.trained_deployments():
            for seed in cfg.seeds:
                start = None
                if method.init_from is not None:
                    start = out / results[(method.init_from, None, seed)]["checkpoint"]
                run_cfg, spec = _run_spec(cfg, method, trained, start)
                result = train_run(run_cfg, spec, None, seed, out)
                result["trained_through"] = trained
                result["init_from"] = method.init_from
                results[(method.name, trained, seed)] = result
    return results


def run_deployment_comparison(
    cfg: DeploymentCompareConfig, out: Path, device: str = "cpu", command: str | None = None
) -> Path:
    """Train what is missing, evaluate every target on shared draws, write the results.

    Returns:
        The path of ``report.md``.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = train_all(cfg, out)
    backbones = {key: load_run_checkpoint(out / r["checkpoint"]).backbone.to(device)
                 for key, r in results.items()}
    module, _, cls = cfg.data["class_path"].rpartition(".")
    dm = getattr(importlib.import_module(module), cls)(**(cfg.data.get("init_args") or {}))
    dm.setup("test")
    x, y = dm.test_x, dm.test_y
    if cfg.evaluation["max_images"] is not None:
        x, y = x[: cfg.evaluation["max_images"]], y[: cfg.evaluation["max_images"]]
    data_digest = tensor_digest(x, y)
    rows: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for target, dep in cfg.deployments.items():
        runs = {}  # model name -> the (method, trained deployment, seed) of its run
        for method in cfg.methods:
            if target not in method.through:
                continue
            for seed in cfg.seeds:
                runs[f"{method.name} seed{seed}"] = (method.name, method.through[target], seed)
        print(f"[compare] {target}: {dep.describe()}")
        summaries = {}
        for name, run in runs.items():
            evaluated = _evaluate_kept(cfg, target, name, backbones[run], results[run], x, y,
                                       out, data_digest)
            rows += [{"target": target, **row} for row in evaluated["rows"]]
            summaries[name] = evaluated["summary"]
        for method in cfg.methods:
            if target in method.through:
                entries.append(_entry(cfg, method, target, summaries, results))
    _write_csv(out / "deployment.csv", rows)
    summary = {"name": cfg.name, "seeds": cfg.seeds, "evaluation": cfg.evaluation,
               "examples": len(y), "deployments": {k: d.to_list() for k, d in cfg.deployments.items()},
               "entries": entries}
    write_atomic(out / "comparison.json",
                 (json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode())
    plot_deployment_comparison(cfg, entries, out / "deployment.png")
    command = command or f"robusttrain compare --config <{cfg.name}.yaml>"
    report = render_deployment_report(cfg, entries, time.perf_counter() - started, command)
    write_atomic(out / "report.md", report.encode())
    return out / "report.md"


def _evaluate_kept(
    cfg: DeploymentCompareConfig, target: str, name: str, backbone: torch.nn.Module,
    result: dict[str, Any], x: torch.Tensor, y: torch.Tensor, out: Path, data_digest: str,
) -> dict[str, Any]:
    """The rows and summary of ``evaluate_deployment`` of one model through ``target``.

    Kept in the model's run folder, ``evaluations/deployment_<target>.json``, as soon as they
    exist, and read back instead of evaluating while the checkpoint, the test data (``data_digest``:
    their :func:`tensor_digest`), the target's steps and the draws are unchanged
    (:mod:`~robusttrain.comparison.evaluation_cache`). One model at a time gives what one call
    over all the models gives: the chips and read-noise runs are paired through their seeds.
    """
    dep = cfg.deployments[target]
    settings = {k: cfg.evaluation[k] for k in ("device_draws", "inference_draws", "seed")}
    checkpoint = out / result["checkpoint"]
    path = kept_path(checkpoint.parent.parent, "deployment", target)
    key = {"evaluation": "deployment", "model": name, "target": target,
           "deployment": dep.to_list(), "checkpoint_sha256": file_digest(checkpoint),
           "data_sha256": data_digest, **settings}

    def evaluate() -> dict[str, Any]:
        one = evaluate_deployment({name: backbone}, x, y, dep, **settings)
        return {"rows": one.rows, "summary": one.summaries[name]}

    value = kept_or_evaluate(
        path, key, evaluate, evaluating=f"evaluating {name} through {target}",
        reusing=f"reusing the evaluation of {name} through {target} ({path.relative_to(out)})")
    return value


def _entry(
    cfg: DeploymentCompareConfig, method: DeploymentMethod, target: str,
    summaries: dict[str, dict[str, Any]], results: dict[tuple[str, str | None, int], dict],
) -> dict[str, Any]:
    """One (method, target): per-seed deployed and float accuracies, their mean/std, costs."""
    trained = method.through[target]
    deployed_acc, float_acc, wall, forwards = [], [], [], []
    for seed in cfg.seeds:
        s = summaries[f"{method.name} seed{seed}"]
        deployed_acc.append(s["values"]["all"]["mean"])
        float_acc.append(s["clean_accuracy"])
        run = results[(method.name, trained, seed)]
        cost_wall, cost_fw = run["wall_time_s"], run["forward_equivalents"]
        if method.init_from is not None:  # the starting model's training is part of the cost
            start = results[(method.init_from, None, seed)]
            cost_wall += start["wall_time_s"]
            cost_fw += start["forward_equivalents"]
        wall.append(cost_wall)
        forwards.append(cost_fw)
    return {
        "method": method.name, "target": target, "trained_through": trained,
        "init_from": method.init_from, "seeds": cfg.seeds,
        "deployed_accuracy": deployed_acc, "float_accuracy": float_acc,
        "mean": float(np.mean(deployed_acc)), "std": _std(deployed_acc),
        "float_mean": float(np.mean(float_acc)), "float_std": _std(float_acc),
        "wall_time_s": float(np.mean(wall)), "forward_equivalents": float(np.mean(forwards)),
    }


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["target", "model", "device_draw", "inference_draw", "device_seed", "inference_seed",
              "accuracy", "loss"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def render_deployment_report(
    cfg: DeploymentCompareConfig, entries: list[dict[str, Any]], seconds: float, command: str
) -> str:
    """``report.md``: the targets, the accuracy table, the float accuracies and the costs."""
    targets = list(cfg.deployments)
    methods = [m.name for m in cfg.methods]
    by = {(e["method"], e["target"]): e for e in entries}
    ev = cfg.evaluation
    lines = [
        f"# Deployment comparison: {cfg.name}",
        "",
        f"Reproduce: `{command}`. Seeds {cfg.seeds}; test accuracy (%) of each trained model run "
        f"through each target deployment, mean over {ev['device_draws']} chips × "
        f"{ev['inference_draws']} read-noise runs (one of each where the deployment has no faults "
        "or no read noise), the same draws for every model; then mean ± std over seeds. "
        f"This call took {seconds / 60:.1f} min (training what was missing, then the evaluation).",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- **{name}**: {dep.describe()}" for name, dep in cfg.deployments.items()]
    lines += ["", "## Accuracy through the deployment (%)", ""]
    lines.append("| method | trained through | " + " | ".join(targets) + " |")
    lines.append("|---" * (len(targets) + 2) + "|")
    for method in cfg.methods:
        through = sorted({str(t or FLOAT) for t in method.through.values()})
        how = FLOAT if through == [FLOAT] else ("each target" if all(
            method.through.get(t) == t for t in method.through) else ", ".join(through))
        cells = []
        for target in targets:
            e = by.get((method.name, target))
            cells.append("—" if e is None else f"{100 * e['mean']:.2f} ± {100 * e['std']:.2f}")
        lines.append(f"| {method.name} | {how} | " + " | ".join(cells) + " |")
    best = []
    for target in targets:
        candidates = [by[(m, target)] for m in methods if (m, target) in by]
        top = max(candidates, key=lambda e: e["mean"])
        best.append(f"{target}: {top['method']} ({100 * top['mean']:.2f})")
    lines += ["", "Best per target: " + "; ".join(best) + ".", "",
              "## Float accuracy of the same models (%) and training cost", "",
              "| method | target | float accuracy | wall time (s) | forward equivalents |",
              "|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['method']} | {e['target']} | {100 * e['float_mean']:.2f} ± "
                     f"{100 * e['float_std']:.2f} | {e['wall_time_s']:.0f} | "
                     f"{e['forward_equivalents']:.3g} |")
    lines += ["", "Costs are per model and seed, including the run it started from (init_from); "
              "a backprop step counts 3 forward equivalents, a zeroth-order step 2N + 2 "
              "(2N members, the logged clean and deployed passes).", ""]
    return "\n".join(lines)


def plot_deployment_comparison(
    cfg: DeploymentCompareConfig, entries: list[dict[str, Any]], path: Path
) -> None:
    """Grouped bars: one group per target, one bar (colour) per method, std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(cfg.deployments)
    methods = [m.name for m in cfg.methods]
    by = {(e["method"], e["target"]): e for e in entries}
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(targets) + 3), 4.6))
    width = 0.8 / max(sum((m, t) in by for m in methods) for t in targets)
    place = {}  # (method, target) -> x: the bars of a target side by side, centred on it
    for j, target in enumerate(targets):
        present = [m for m in methods if (m, target) in by]
        for k, method in enumerate(present):
            place[(method, target)] = j + width * (k - (len(present) - 1) / 2)
    # the legend's entries: one bar group (a tuple of bars) per method, and the float line
    handles: list[Artist | tuple[Artist, ...]] = []
    for i, method in enumerate(methods):
        keys = [(method, t) for t in targets if (method, t) in by]
        handles.append(ax.bar([place[k] for k in keys], [100 * by[k]["mean"] for k in keys], width,
                              yerr=[100 * by[k]["std"] for k in keys], capsize=2, label=method,
                              color=plt.get_cmap("tab10")(i % 10)))
    floats = [(by[(m, t)]["float_mean"], m) for m in methods for t in targets
              if (m, t) in by and by[(m, t)]["trained_through"] is None]
    if floats:
        accuracy, method = max(floats)
        handles.append(ax.axhline(100 * accuracy, color="black", linestyle="--", linewidth=1,
                                  label=f"{method}, float weights (no deployment)"))
    ax.set_xticks(range(len(targets)), targets, rotation=20 if len(targets) > 4 else 0)
    low = min(100 * e["mean"] - 100 * e["std"] for e in entries)
    ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), 100)
    ax.set_ylabel("test accuracy through the deployment (%)")
    ax.set_title(f"{cfg.name}: mean over {len(cfg.seeds)} seeds (bars: std)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)
    fig.tight_layout()
    save_figure(fig, path)

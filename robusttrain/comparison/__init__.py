"""Comparison of training methods: each trained on the same network, data and seeds, then all
evaluated under the same weight-noise draws, under one or several noise models.

* :mod:`robusttrain.comparison.config` — the comparison file (YAML: ``sigmas`` or ``levels`` per
  method, one or several evaluation noise models) and its checks.
* :mod:`robusttrain.comparison.evaluation_cache` — each model's evaluation, kept in its run folder
  and reused by a later call while nothing that determines it has changed.
* :mod:`robusttrain.comparison.runner` — training every run (resumable) and evaluating them all.
* :mod:`robusttrain.comparison.report` — summaries over seeds, ``report.md``, the robustness and
  frontier plots.
* :mod:`robusttrain.comparison.deployment` — the comparison for a deployment (quantized, faulty,
  noisy hardware): methods trained for it, evaluated through it.
"""

from robusttrain.comparison.config import (
    CompareConfig,
    CompareConfigError,
    MethodSpec,
    RobustnessSpec,
    Variant,
    load_config,
)
from robusttrain.comparison.deployment import (
    DeploymentCompareConfig,
    DeploymentMethod,
    load_deployment_config,
    run_deployment_comparison,
)
from robusttrain.comparison.report import (
    frontier_figure,
    plot_frontier,
    plot_robustness,
    render_report,
    robustness_figure,
    summarize_runs,
)
from robusttrain.comparison.runner import run_comparison, train_run

__all__ = [
    "CompareConfig",
    "CompareConfigError",
    "DeploymentCompareConfig",
    "DeploymentMethod",
    "MethodSpec",
    "RobustnessSpec",
    "Variant",
    "frontier_figure",
    "load_config",
    "load_deployment_config",
    "plot_frontier",
    "plot_robustness",
    "render_report",
    "robustness_figure",
    "run_comparison",
    "run_deployment_comparison",
    "summarize_runs",
    "train_run",
]

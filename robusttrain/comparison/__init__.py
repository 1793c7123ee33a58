"""Comparison of training methods: each trained on the same network, data and seeds, then all
evaluated under the same weight-noise draws.

* :mod:`robusttrain.comparison.config` — the comparison file (YAML) and its checks.
* :mod:`robusttrain.comparison.runner` — training every run (resumable) and evaluating them all.
* :mod:`robusttrain.comparison.report` — summaries over seeds, ``report.md``, the frontier plot.
"""

from robusttrain.comparison.config import (
    CompareConfig,
    CompareConfigError,
    MethodSpec,
    load_config,
)
from robusttrain.comparison.report import summarize_runs
from robusttrain.comparison.runner import run_comparison, train_run

__all__ = [
    "CompareConfig",
    "CompareConfigError",
    "MethodSpec",
    "load_config",
    "run_comparison",
    "summarize_runs",
    "train_run",
]

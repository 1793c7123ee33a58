"""Comparison of training methods: train each on the same network, data and seeds, then evaluate
all under the same weight-noise draws.

* :mod:`robusttrain.comparison.runner` — the comparison file, training the runs, the report.
"""

from robusttrain.comparison.runner import (
    CompareConfig,
    CompareConfigError,
    MethodSpec,
    load_config,
    run_comparison,
)

__all__ = ["CompareConfig", "CompareConfigError", "MethodSpec", "load_config", "run_comparison"]

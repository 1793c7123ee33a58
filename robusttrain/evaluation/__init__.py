"""Evaluation: how much accuracy a trained model keeps when its weights are perturbed.

* :mod:`robusttrain.evaluation.statistics` — pure functions: per-level statistics with a 95% CI,
  the levels of a 1/5/10-point drop, the area under the accuracy-vs-level curve.
* :mod:`robusttrain.evaluation.robustness` — the evaluation loop: paired weight-noise draws, the
  exact first-linear-layer shortcut for MLPs, BatchNorm statistics kept or re-estimated.
* :mod:`robusttrain.evaluation.report` — ``robustness.csv``, ``summary.json``, ``robustness.png``
  and the plain-text table.
"""

from robusttrain.evaluation.report import format_table, plot_robustness, write_report
from robusttrain.evaluation.robustness import (
    BN_MODES,
    CSV_FIELDS,
    DROP_POINTS,
    RobustnessResult,
    draw_seed,
    evaluate,
    evaluate_models,
    level_key,
)
from robusttrain.evaluation.statistics import (
    CI_METHOD,
    area_under_curve,
    drop_levels,
    level_statistics,
    t_quantile_975,
)

__all__ = [
    "BN_MODES",
    "CI_METHOD",
    "CSV_FIELDS",
    "DROP_POINTS",
    "RobustnessResult",
    "area_under_curve",
    "draw_seed",
    "drop_levels",
    "evaluate",
    "evaluate_models",
    "format_table",
    "level_key",
    "level_statistics",
    "plot_robustness",
    "t_quantile_975",
    "write_report",
]

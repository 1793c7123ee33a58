"""Evaluation: how much accuracy a trained model keeps when its weights are perturbed.

* :mod:`robusttrain.evaluation.robustness` — the evaluation loop under paired weight-noise draws.
"""

from robusttrain.evaluation.robustness import (
    BN_MODES,
    DROP_POINTS,
    RobustnessResult,
    area_under_curve,
    draw_seed,
    drop_levels,
    evaluate,
    evaluate_models,
    format_table,
    level_statistics,
    plot_robustness,
    t_quantile_975,
    write_report,
)

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
    "plot_robustness",
    "t_quantile_975",
    "write_report",
]

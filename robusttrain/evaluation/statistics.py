r"""Statistics of accuracy under weight noise: pure functions of the measured numbers.

Per model and level the accuracies of the draws are summarized by mean, standard deviation,
5th/95th percentile, minimum and a 95% confidence interval of the mean,

    mean ± t_{0.975, n−1} · std / √n      (Student t, n = draws),

and per model by the levels where mean accuracy falls 1, 5 and 10 points below the clean accuracy
(linear interpolation) and the trapezoidal area under the accuracy-vs-level curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

__all__ = [
    "CI_METHOD",
    "LevelStatistics",
    "area_under_curve",
    "drop_levels",
    "level_statistics",
    "t_quantile_975",
]

# 97.5% quantiles of Student's t (two-sided 95%), df = 1..30, from standard tables
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959963984540054
CI_METHOD = (
    "95% CI of the mean over draws: mean ± t·std/√n, Student t quantile from a table for df ≤ 30 "
    "and the Cornish–Fisher expansion around the normal quantile beyond"
)



def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (no scipy).

    A table (3 decimals) for df ≤ 30; beyond, the Cornish–Fisher expansion around z = 1.959964,

        t ≈ z + (z³ + z)/(4·df) + (5z⁵ + 16z³ + 3z)/(96·df²),

    whose error is below 2e-4 for df > 30 and vanishes as df grows.

    Args:
        df: degrees of freedom, >= 1.

    Example:
        >>> t_quantile_975(1), t_quantile_975(10)
        (12.706, 2.228)
        >>> round(t_quantile_975(100), 3)  # from the expansion; the exact quantile is 1.98397
        1.984
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


class LevelStatistics(TypedDict):
    """What :func:`level_statistics` returns (a plain dict at run time)."""

    n: int
    mean: float
    std: float
    p5: float
    p95: float
    min: float
    max: float
    ci95_low: float | None
    ci95_high: float | None


def level_statistics(values: Sequence[float]) -> LevelStatistics:
    """Summary of the draws at one level: n, mean, std, percentiles, extremes, 95% CI of the mean.

    ``std`` is the sample standard deviation (ddof 1); ``p5``/``p95`` are linear-interpolation
    percentiles (numpy's default); the CI is mean ± t_{0.975, n−1}·std/√n (``None`` for n = 1).

    Args:
        values: one value per draw (at least one, all finite).

    Example:
        >>> stats = level_statistics([0.90, 0.92, 0.94])
        >>> stats["n"], round(stats["mean"], 4), round(stats["std"], 4)
        (3, 0.92, 0.02)
        >>> round(stats["ci95_low"], 4), round(stats["ci95_high"], 4)  # 0.92 ∓ 4.303·0.02/√3
        (0.8703, 0.9697)
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"need a non-empty list of finite numbers, got {list(arr.ravel())[:5]}")
    n = int(arr.size)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "p5": float(np.percentile(arr, 5)),
        "p95": float(np.percentile(arr, 95)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "ci95_low": None if half is None else mean - half,
        "ci95_high": None if half is None else mean + half,
    }


def _sorted_curve(levels: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lv = np.asarray(levels, dtype=float)
    val = np.asarray(values, dtype=float)
    if lv.ndim != 1 or lv.shape != val.shape or lv.size == 0:
        raise ValueError(
            f"levels and accuracies must be equally long non-empty lists, got {lv.size} levels "
            f"and {val.size} accuracies"
        )
    if not (np.all(np.isfinite(lv)) and np.all(np.isfinite(val))):
        raise ValueError("levels and accuracies must be finite numbers")
    order = np.argsort(lv, kind="stable")
    lv, val = lv[order], val[order]
    if np.any(np.diff(lv) == 0):
        raise ValueError(f"levels must be distinct, got {sorted(lv.tolist())}")
    return lv, val


def drop_levels(
    levels: Sequence[float],
    accuracies: Sequence[float],
    clean: float,
    drops: Sequence[float] = (0.01, 0.05, 0.10),
) -> list[float | None]:
    """The noise level at which accuracy first falls ``drop`` below ``clean``, for each drop.

    With the curve sorted by level, the first level i with acc_i <= clean − drop is found and the
    crossing is interpolated linearly on the segment before it,

        level = l_{i−1} + (acc_{i−1} − target) / (acc_{i−1} − acc_i) · (l_i − l_{i−1}),

    which is l_i itself when the curve meets the target exactly at a grid point. ``None`` when the
    curve never falls that far (not reached within the evaluated levels).

    Args:
        levels: evaluated noise levels (distinct; any order).
        accuracies: mean accuracy at each level, as fractions.
        clean: accuracy of the unperturbed model, as a fraction.
        drops: the drops, as fractions (0.05 = 5 percentage points).

    Example:
        Clean accuracy 90%: one point is lost halfway to level 0.1, five points at 3/8 of the
        way from 0.1 to 0.2, ten points exactly at 0.2:

        >>> levels = drop_levels([0.0, 0.1, 0.2], [0.90, 0.88, 0.80], clean=0.90)
        >>> [round(level, 4) for level in levels]
        [0.05, 0.1375, 0.2]
        >>> drop_levels([0.0, 0.1], [0.90, 0.89], clean=0.90, drops=[0.05])  # never 5 points
        [None]
    """
    lv, acc = _sorted_curve(levels, accuracies)
    out: list[float | None] = []
    for drop in drops:
        target = clean - drop
        # 1e-12 absorbs rounding in clean − drop (0.9 − 0.05 = 0.8500000000000001)
        below = np.nonzero(acc <= target + 1e-12)[0]
        if below.size == 0:
            out.append(None)
            continue
        i = int(below[0])
        if i == 0 or acc[i - 1] <= acc[i]:
            out.append(float(lv[i]))
            continue
        frac = min(1.0, (acc[i - 1] - target) / (acc[i - 1] - acc[i]))
        out.append(float(lv[i - 1] + frac * (lv[i] - lv[i - 1])))
    return out


def area_under_curve(
    levels: Sequence[float], accuracies: Sequence[float], normalize: bool = True
) -> float:
    """Trapezoidal area under accuracy vs level, Σ_i (l_{i+1} − l_i)·(acc_i + acc_{i+1})/2.

    Args:
        levels: evaluated noise levels (distinct; any order).
        accuracies: mean accuracy at each level.
        normalize: divide by the level range (max − min), which turns the area into the average
            accuracy over the range; with a single level, that level's accuracy.

    Example:
        >>> round(area_under_curve([0.0, 0.1, 0.2], [0.90, 0.88, 0.80], normalize=False), 4)
        0.173
        >>> round(area_under_curve([0.0, 0.1, 0.2], [0.90, 0.88, 0.80]), 4)  # mean accuracy
        0.865
    """
    lv, acc = _sorted_curve(levels, accuracies)
    if lv.size < 2:
        return float(acc[0]) if normalize else 0.0
    area = float(np.sum(np.diff(lv) * (acc[1:] + acc[:-1]) / 2))
    return area / float(lv[-1] - lv[0]) if normalize else area

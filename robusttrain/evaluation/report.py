"""The report of a robustness evaluation: CSV, JSON summary, plot and plain-text table.

:func:`write_report` writes ``robustness.csv`` (one row per model, level and draw),
``summary.json`` (settings and per-model statistics) and ``robustness.png`` (accuracy vs level,
:func:`plot_robustness`), each atomically; :func:`format_table` is the table the commands print.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robusttrain.evaluation.robustness import CSV_FIELDS, DROP_POINTS, RobustnessResult, level_key
from robusttrain.files import write_atomic

__all__ = ["format_table", "plot_robustness", "robustness_figure", "write_report"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: RobustnessResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``robustness.csv``, ``summary.json`` and ``robustness.png`` atomically into ``out_dir``.

    The CSV has one row per (model, level, draw) with the columns of ``CSV_FIELDS`` (``seed`` is
    the draw's seed; level 0 is the clean model) at full float precision, so statistics
    recomputed from it match ``summary.json`` exactly. The JSON holds the settings and, per model,
    the clean accuracy, per-level statistics, drop levels, AUC and which tensors were perturbed.

    Args:
        result: what :func:`~robusttrain.evaluation.robustness.evaluate_models` returned.
        out_dir: output folder (created if missing).

    Returns:
        The paths, keyed ``"csv"``, ``"json"`` and ``"png"``.
    """
    out = Path(out_dir)
    paths = {"csv": out / "robustness.csv", "json": out / "summary.json",
             "png": out / "robustness.png"}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: row[k] for k in CSV_FIELDS})
    write_atomic(paths["csv"], buf.getvalue().encode())
    summary = _json_safe({"settings": result.settings, "models": result.summaries})
    text = json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    write_atomic(paths["json"], text.encode())
    plot_robustness(result.summaries, paths["png"])
    return paths


def _percent(stats: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """``100 * stats[i][key]`` per level; the mean where a CI is undefined (a single draw)."""
    return np.array([100 * (s[key] if s[key] is not None else s["mean"]) for s in stats])


_LEVEL_LABELS = {
    "relative": "η (noise std / max|W| of each tensor)",
    "absolute": "σ (noise std)",
    "multiplicative": "η (noise std / |w| of each weight)",
}


def plot_robustness(
    summaries: Mapping[str, Mapping[str, Any]] | RobustnessResult, path: str | Path
) -> None:
    """:func:`robustness_figure`, written atomically as a PNG (Agg backend).

    Args:
        summaries: as in :func:`robustness_figure`.
        path: the PNG to write.
    """

    save_figure(robustness_figure(summaries), path)


def save_figure(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as a PNG (120 dpi) atomically, then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue())


def robustness_figure(summaries: Mapping[str, Mapping[str, Any]] | RobustnessResult) -> Any:
    """Accuracy vs noise level, models overlaid, as a matplotlib figure (Agg backend).

    Each model gets its mean-accuracy line, a shaded band from the 5th to the 95th percentile of
    the draws, error bars for the 95% CI of the mean, and a dotted line at its clean accuracy; the
    legend says which is which.

    Args:
        summaries: model name -> summary as in ``summary.json`` (``result.summaries``), or a
            :class:`RobustnessResult`.

    The legend sits outside the axes, and the title names the BatchNorm setting only when a
    model has BatchNorm layers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(summaries, RobustnessResult):
        summaries = summaries.summaries
    if not summaries:
        raise ValueError("nothing to plot: no model summaries")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    handles = []
    noise = bn_mode = draws = None
    any_batchnorm = False
    for i, (name, summary) in enumerate(summaries.items()):
        stats = sorted(summary["levels"].values(), key=lambda s: s["level"])
        handles.append(draw_accuracy_curve(ax, i, name, [s["level"] for s in stats], stats,
                                           summary["clean_accuracy"]))
        noise, bn_mode, draws = summary.get("noise"), summary.get("bn_mode"), summary.get("draws")
        any_batchnorm = any_batchnorm or bool(summary.get("batchnorm_layers", 0))
    ax.set_xlabel("noise level" if noise is None else _LEVEL_LABELS.get(noise, "noise level"))
    ax.set_ylabel("accuracy (%)")
    # the BatchNorm setting only applies to networks that have BatchNorm layers
    batchnorm = f", BatchNorm statistics: {bn_mode}" if any_batchnorm else ""
    ax.set_title(f"accuracy under {noise} weight noise ({draws} draws per level{batchnorm})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    outside_legend(ax, handles)
    fig.tight_layout()
    return fig


def draw_accuracy_curve(
    ax: Any, index: int, name: str, x: Sequence[float], stats: Sequence[Mapping[str, Any]],
    clean_accuracy: float,
) -> Any:
    """One model's curve on ``ax``: mean line, 5th–95th percentile band, 95% CI error bars and a
    dotted line at its clean accuracy, in colour ``index``; returns its legend handle."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    color = plt.cm.tab10(index % 10)
    levels = np.asarray(x, dtype=float)
    mean = _percent(stats, "mean")
    ax.fill_between(levels, _percent(stats, "p5"), _percent(stats, "p95"), color=color, alpha=0.15,
                    lw=0)
    ci_low, ci_high = _percent(stats, "ci95_low"), _percent(stats, "ci95_high")
    ax.errorbar(levels, mean, yerr=[mean - ci_low, ci_high - mean], fmt="o-", color=color,
                markersize=3, capsize=2, lw=1.3)
    ax.axhline(100 * clean_accuracy, color=color, ls=":", lw=0.9)
    return Line2D([], [], color=color, marker="o", markersize=3, label=name)


def outside_legend(ax: Any, handles: list[Any]) -> None:
    """The models' handles plus what band, error bar and dotted line mean, outside the axes (so
    that it never covers a curve)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = handles + [
        Patch(color="gray", alpha=0.25, label="band: 5th–95th percentile of draws"),
        Line2D([], [], color="gray", marker="|", ls="none", label="error bar: 95% CI of the mean"),
        Line2D([], [], color="gray", ls=":", label="dotted: clean accuracy"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)


def _fmt_level(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.3g}"


def format_table(result: RobustnessResult) -> str:
    """A plain-text table: clean accuracy, mean accuracy per level (%), drop levels, AUC.

    Args:
        result: what :func:`~robusttrain.evaluation.robustness.evaluate_models` returned.
    """
    levels = [level for level in result.settings["levels"] if level != 0]
    head = (["model", "clean"] + [f"{level:g}" for level in levels]
            + [f"-{p}pt at" for p in DROP_POINTS] + ["avg acc (AUC/range)"])
    lines = [head]
    for name, s in result.summaries.items():
        row = [name, f"{100 * s['clean_accuracy']:.2f}"]
        row += [f"{100 * s['levels'][level_key(level)]['mean']:.2f}" for level in levels]
        row += [_fmt_level(s[f"drop_{p}pt"]) for p in DROP_POINTS]
        row.append(f"{100 * s['auc_normalized']:.2f}")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


"""The report of a comparison: per (method, σ) summaries over seeds, ``report.md``, frontier plot.

:func:`summarize_runs` turns the per-draw rows of ``robustness.csv`` into one entry per
(method, σ) (``comparison.json``); :func:`render_report` writes them as the Markdown table of
``report.md``; :func:`plot_frontier` draws clean accuracy against accuracy under noise.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from robusttrain.comparison.config import CompareConfig
from robusttrain.evaluation import area_under_curve, drop_levels
from robusttrain.files import write_atomic

__all__ = ["plot_frontier", "render_report", "run_label", "summarize_runs"]


def run_label(r: dict[str, Any]) -> str:
    """``"<method>"``, or ``"<method> σ=<sigma>"`` for a run trained with a σ."""
    return r["method"] if r["sigma"] is None else f"{r['method']} σ={r['sigma']:g}"



def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not reached"
    return f"{value:.{digits}f}"



def summarize_runs(
    results: list[dict[str, Any]], rows: list[dict[str, Any]], levels: list[float]
) -> list[dict[str, Any]]:
    """Aggregate the per-draw rows of the robustness CSV into one entry per (method, σ).

    Per seed, accuracy at a level is the mean over its draws; the entry holds, per level, the mean
    and standard deviation of that over seeds, the drop levels (1/5/10 points below the clean
    accuracy) and normalized area of the seed-averaged curve, and the mean wall time and
    forward-pass equivalents per run.
    """
    by_model: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {}).setdefault(row["level"], []).append(row["accuracy"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(run_label(r), []).append(r)
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


def render_report(
    cfg: CompareConfig,
    entries: list[dict[str, Any]],
    rob: dict[str, Any],
    elapsed: float,
    command: str,
) -> str:
    """The Markdown of ``report.md``: settings, the table of ``entries``, the σ-to-η table."""
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


def plot_frontier(entries: list[dict[str, Any]], levels: list[float], path: Path) -> None:
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


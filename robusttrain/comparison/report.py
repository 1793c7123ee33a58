"""The report of a comparison: per (method, variant) summaries over seeds, ``report.md``, plots.

An *entry* is one (method, variant) — a variant being a training σ, a training level η_train or
neither (:class:`~robusttrain.comparison.config.Variant`) — summarized over its seeds under one
evaluation noise model.

* :func:`summarize_runs` turns the per-draw rows of ``robustness.csv`` into the entries of one noise
  model. ``comparison.json`` holds them: a list for a single noise model (``robustness.noise`` a
  string), or a mapping noise model -> list (``robustness.noise`` a list).
* :func:`render_report` writes ``report.md``: per noise model a table (clean accuracy, every level,
  drop levels, AUC, mean max|W|, cost), the primary noise model "at matched clean accuracy"
  (drops relative to the config's first method), and the units of absolute σ.
* :func:`robustness_figure` / :func:`plot_robustness`: accuracy vs noise level, one curve per entry
  (mean over seeds, band ±1 std over seeds); :func:`frontier_figure` / :func:`plot_frontier`: clean
  accuracy against accuracy at η = 0.1 (and 0.2). Both use one colour per method and one line
  style and marker per variant, with the legend outside the axes on the right.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robusttrain.comparison.config import CompareConfig, Variant
from robusttrain.evaluation import area_under_curve, drop_levels
from robusttrain.files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "frontier_figure",
    "plot_frontier",
    "plot_robustness",
    "render_report",
    "robustness_figure",
    "run_label",
    "summarize_runs",
]


def run_label(r: Mapping[str, Any]) -> str:
    """``"<method>"``, ``"<method> σ=<sigma>"`` or ``"<method> η=<level>"`` of a run or entry.

    ``level`` may be missing (result files written before training levels existed).
    """
    return Variant(sigma=r.get("sigma"), level=r.get("level")).label(r["method"])


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not reached"
    return f"{value:.{digits}f}"


def summarize_runs(
    results: list[dict[str, Any]], rows: list[dict[str, Any]], levels: list[float]
) -> list[dict[str, Any]]:
    """Aggregate the per-draw rows of one noise model's CSV into one entry per (method, variant).

    Per seed, accuracy at a level is the mean over its draws; the entry holds, per level, the mean
    and standard deviation of that over seeds, the drop levels (1/5/10 points below the clean
    accuracy) and normalized area of the seed-averaged curve, and the mean wall time,
    forward-pass equivalents and mean layer max|W| per run.

    Args:
        results: one dict per run (``result.json`` plus ``key``, its model name in ``rows``, and
            ``max_abs_weight``); ``level`` and ``noise`` may be missing (older runs).
        rows: ``model``, ``level``, ``accuracy`` of every measurement.
        levels: the evaluated levels, sorted, 0 included; ``level_mean``/``level_std`` follow them.
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
                "level": runs[0].get("level"),
                "noise": runs[0].get("noise"),
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
                "weight_crest": float(np.mean([r.get("weight_crest", float("nan"))
                                               for r in runs])),
            }
        )
    return entries


def _pct(mean: float, std: float | None = None) -> str:
    if std is None or std == 0.0:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _symbol(noise: str) -> str:
    """The name of a level of ``noise``: σ for absolute noise, η for the others."""
    return "σ" if noise == "absolute" else "η"


def _trained_with(e: Mapping[str, Any]) -> str:
    if e.get("level") is not None:
        return f"η={e['level']:g} ({e.get('noise')})"
    if e.get("sigma") is not None:
        return f"σ={e['sigma']:g}"
    return "—"


def _nearest_level(levels: Sequence[float], target: float = 0.1) -> float:
    """The nonzero level nearest ``target`` (the smaller one on a tie)."""
    noisy = [lvl for lvl in levels if lvl != 0.0] or list(levels)
    return min(noisy, key=lambda lvl: (abs(lvl - target), lvl))


_MD_MAX_W = r"mean max\|W\|"
_MD_CREST = r"max\|W\|/rms"


def _crest(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1f}"


def _table(noise: str, levels: list[float], entries: list[dict[str, Any]]) -> list[str]:
    sym = _symbol(noise)
    level_cols = [f"{sym}={lvl:g}" for lvl in levels if lvl != 0.0]
    header = ["method", "trained with", "clean", *level_cols, "1-pt drop", "5-pt drop",
              "10-pt drop", "AUC", _MD_MAX_W, _MD_CREST, "wall time / run",
              "forward equiv. / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [e["method"], _trained_with(e), _pct(e["clean_mean"], e["clean_std"])]
        cells += [_pct(e["level_mean"][i], e["level_std"][i])
                  for i, lvl in enumerate(levels) if lvl != 0.0]
        cells += [_fmt(d, 3) for d in e["drops"]]
        cells += [f"{100 * e['auc']:.2f}", f"{e['max_abs_weight']:.3f}",
                  _crest(e.get("weight_crest")), f"{e['wall_time_s']:.0f} s",
                  f"{e['forward_equivalents']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _matched_section(
    noise: str, levels: list[float], entries: list[dict[str, Any]], reference: str
) -> list[str]:
    """Clean and noisy accuracy, drop and drop relative to ``reference``, by clean accuracy."""
    target = _nearest_level(levels)
    i = levels.index(target)
    sym = _symbol(noise)
    ref = next((e for e in entries if e["method"] == reference), None)
    ref_drop = None if ref is None else ref["clean_mean"] - ref["level_mean"][i]
    ref_name = reference if ref is None else ref["label"]
    lines = [
        "## At matched clean accuracy",
        "",
        f"Under `{noise}` noise at {sym} = {target:g}"
        + ("" if target == 0.1 else f" (the evaluated level nearest {sym} = 0.1)")
        + ", sorted by clean accuracy, so entries of similar clean accuracy sit side by side. "
        "Drop: clean minus noisy mean accuracy, in points. Relative drop: that drop divided by the "
        f"drop of `{ref_name}` (the first method of the config); below 1 the entry loses less "
        "accuracy to the noise than the reference.",
        "",
        f"| entry | clean (%) | at {sym}={target:g} (%) | drop (points) | drop / drop of {ref_name} |",
        "|---|---|---|---|---|",
    ]
    for e in sorted(entries, key=lambda e: e["clean_mean"], reverse=True):
        drop = e["clean_mean"] - e["level_mean"][i]
        ratio = "—" if ref_drop is None or ref_drop <= 0 else f"{drop / ref_drop:.2f}"
        lines.append(f"| {e['label']} | {100 * e['clean_mean']:.2f} | "
                     f"{100 * e['level_mean'][i]:.2f} | {100 * drop:.2f} | {ratio} |")
    return lines


def _units_section(entries: list[dict[str, Any]], evaluated: Sequence[str]) -> list[str]:
    """How the absolute training σ relates to the evaluation's relative η; [] without σ entries."""
    sigma_entries = [e for e in entries if e.get("sigma") is not None]
    if not sigma_entries:
        return []
    relative = "relative" in evaluated
    lines = [
        "## Units of σ and η",
        "",
        "Entries trained with a σ (`sigmas:`) smoothed with an *absolute* σ: every weight gets σ·g. "
        + (
            "Relative noise is w + η·max|W_layer|·ε, so a training σ corresponds to "
            "η ≈ σ / max|W_layer|. Mean max|W| over the Linear/Conv layers of the trained models, "
            "and that equivalent η:"
            if relative
            else "Mean max|W| over the Linear/Conv layers of the trained models:"
        ),
        "",
        r"| method | σ | mean max\|W\| |" + (" σ as relative η |" if relative else ""),
        "|---|---|---|" + ("---|" if relative else ""),
    ]
    for e in sigma_entries:
        row = f"| {e['method']} | {e['sigma']:g} | {e['max_abs_weight']:.3f} |"
        if relative:
            row += f" {e['sigma'] / e['max_abs_weight']:.3g} |"
        lines.append(row)
    lines.append("")
    return lines


def render_report(
    cfg: CompareConfig,
    entries: Mapping[str, list[dict[str, Any]]],
    elapsed: float,
    command: str,
) -> str:
    """The Markdown of ``report.md``.

    Args:
        cfg: the comparison (settings; its first method is the reference of the relative drops).
        entries: evaluation noise model -> its entries (:func:`summarize_runs`), primary first.
        elapsed: wall time of the comparison run, in seconds.
        command: the command that reproduces it.
    """
    spec = cfg.robustness_spec()
    data = cfg.data["class_path"].rsplit(".", 1)[-1]
    backbone = cfg.backbone["class_path"].rsplit(".", 1)[-1]
    noise_text = "; ".join(f"`{n}` at levels {levels}" for n, levels in spec.levels.items())
    any_entries = [e for es in entries.values() for e in es]
    lines = [
        f"# Comparison `{cfg.name}`",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- Data: {data} (accuracy on the test split), backbone: {backbone} "
        f"`{json.dumps(cfg.backbone.get('init_args', {}))}`",
        f"- Training budget, the same for every method: `{json.dumps(cfg.trainer)}`; "
        f"seeds {cfg.seeds}",
        f"- Weight noise: {noise_text}; {spec.draws} draws per level (seed {spec.seed}); every "
        "model sees the same draws (paired)"
        + (", also across noise models" if len(spec.levels) > 1 else "")
        + ". BatchNorm: running statistics from training kept.",
        f"- Wall time of this comparison (training that was not already done, plus evaluation): "
        f"{elapsed / 60:.1f} min",
    ]
    if any(e.get("level") is not None for e in any_entries):
        lines.append(
            "- Entries trained with η (`levels:`, column \"trained with\") smoothed in the units of "
            "their own noise model, the same units as the evaluation's η under that noise model: "
            "no conversion needed."
        )
    lines += [
        "",
        "Accuracy in %, mean ± standard deviation over seeds (each seed's value is the mean over "
        "its draws). Drop columns: the noise level at which mean accuracy falls 1, 5 and 10 points "
        "below the clean accuracy (linear interpolation). AUC: area under the accuracy-vs-level "
        "curve divided by the level range (an average accuracy). Mean max|W|: max|W| of each "
        "Linear/Conv weight tensor, averaged over tensors and seeds; max|W|/rms: the spread of "
        "each tensor's weights, max|W| over their root-mean-square, averaged the same way (relative "
        "noise puts η·max|W| on every weight, so a typical weight gets noise η·max|W|/rms of its "
        "size: the smaller this ratio, the less the same η hurts). Forward-pass equivalents per "
        "run: a backprop step counts 3, a zeroth-order step 2N + 1.",
        "",
    ]
    for noise, levels in spec.levels.items():
        lines += [f"## Accuracy under {noise} weight noise", ""]
        lines += _table(noise, levels, entries[noise]) + [""]
    primary = spec.primary
    lines += _matched_section(primary, spec.levels[primary], entries[primary], cfg.methods[0].name)
    lines.append("")
    # σ and max|W| are properties of the trained models, the same under every noise model
    lines += _units_section(entries[primary], list(spec.levels))
    if spec.per_noise_folders:
        files = (
            "Files: per noise model a folder `<noise>/` ("
            + ", ".join(f"`{n}/`" for n in spec.levels)
            + ") with `robustness.csv` (every model, level and draw), `summary.json` (per-model "
            "statistics), `robustness.png` (accuracy vs level, mean over seeds per method and "
            "variant) and `frontier.png` (clean accuracy against accuracy under noise); "
            "`comparison.json` (the entries of the tables, per noise model), `runs/` (checkpoints, "
            "logs, configs)."
        )
    else:
        files = (
            "Files: `robustness.csv` (every model, level and draw), `summary.json` (per-model "
            "statistics), `robustness.png` (accuracy vs level, mean over seeds per method and "
            "variant), `frontier.png` (clean accuracy against accuracy under noise, one point per "
            "method and variant), `comparison.json` (the entries of the table), `runs/` "
            "(checkpoints, logs, configs)."
        )
    lines += [files, ""]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------

_LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

_AXIS_LABELS = {
    "relative": "relative weight noise η (fraction of max|W| per layer)",
    "multiplicative": "multiplicative weight noise η (fraction of |w|)",
    "absolute": "absolute weight noise σ (std of the noise added to each weight)",
}


def _styles(entries: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Any, Any, str]]:
    """label -> (colour, line style, marker): a colour per method, a style and marker per variant."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    methods: dict[str, int] = {}
    variants: dict[str, int] = {}
    styles = {}
    for e in entries:
        m = methods.setdefault(e["method"], len(methods))
        v = variants.get(e["method"], 0)
        variants[e["method"]] = v + 1
        styles[e["label"]] = (palette(m % 10), _LINESTYLES[v % len(_LINESTYLES)],
                              _MARKERS[v % len(_MARKERS)])
    return styles


def _seeds_text(entries: Sequence[Mapping[str, Any]]) -> str:
    counts = sorted({len(e["seeds"]) for e in entries})
    return "/".join(str(c) for c in counts) + (" seed" if counts == [1] else " seeds")


def robustness_figure(
    entries: Sequence[Mapping[str, Any]], levels: Sequence[float], noise: str, draws: int | None = None
) -> Figure:
    """Accuracy vs noise level: per entry the mean over seeds, shaded ±1 std over seeds.

    Args:
        entries: :func:`summarize_runs` output for ``noise``.
        levels: the levels ``level_mean`` follows.
        noise: the evaluation noise model (axis label).
        draws: draws per level (title), if known.

    Returns:
        The matplotlib figure (Agg); the legend is outside the axes, on the right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        raise ValueError("nothing to plot: no entries")
    styles = _styles(entries)
    lv = np.asarray(levels, dtype=float)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for e in entries:
        color, ls, marker = styles[e["label"]]
        mean, std = 100 * np.asarray(e["level_mean"]), 100 * np.asarray(e["level_std"])
        ax.fill_between(lv, mean - std, mean + std, color=color, alpha=0.12, lw=0)
        ax.plot(lv, mean, color=color, ls=ls, marker=marker, markersize=4.5, lw=1.5,
                label=e["label"])
    ax.set_xlabel(_AXIS_LABELS.get(noise, f"{noise} weight noise level"))
    ax.set_ylabel("test accuracy (%)")
    per_level = f", {draws} draws per level" if draws else ""
    ax.set_title(f"accuracy under {noise} weight noise\nline: mean over {_seeds_text(entries)}; "
                 f"band: ±1 std over seeds{per_level}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0,
              title="method and variant", title_fontsize=8)
    return fig


def _frontier_levels(levels: Sequence[float]) -> list[float]:
    return [lvl for lvl in (0.1, 0.2) if lvl in levels] or [_nearest_level(levels)]


def frontier_figure(
    entries: Sequence[Mapping[str, Any]], levels: Sequence[float], noise: str = "relative"
) -> Figure:
    """Clean accuracy (x) against accuracy at η = 0.1 (y), and at η = 0.2 in a second panel.

    Each entry is one point with error bars of ±1 std over seeds in x and y; without η = 0.1 or 0.2
    evaluated, the level nearest 0.1 is used. No labels beside the points: the legend (outside the
    axes, on the right) names them by colour and marker.

    Returns:
        The matplotlib figure (Agg).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        raise ValueError("nothing to plot: no entries")
    styles = _styles(entries)
    sym = _symbol(noise)
    targets = _frontier_levels(levels)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.4), squeeze=False)
    for ax, lvl in zip(axes[0], targets):
        i = list(levels).index(lvl)
        for e in entries:
            color, _, marker = styles[e["label"]]
            ax.errorbar(100 * e["clean_mean"], 100 * e["level_mean"][i],
                        xerr=100 * e["clean_std"], yerr=100 * e["level_std"][i],
                        fmt=marker, color=color, markersize=6, capsize=3, elinewidth=1,
                        label=e["label"])
        ax.set_xlabel("clean test accuracy (%)")
        ax.set_ylabel(f"test accuracy at {sym} = {lvl:g} (%)")
        ax.set_title(f"{noise} weight noise, {sym} = {lvl:g}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"clean accuracy vs accuracy under noise (error bars: ±1 std over "
                 f"{_seeds_text(entries)})", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left",
                       borderaxespad=0.0, title="method and variant", title_fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    # "tight" grows the canvas to hold the legend outside the axes
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue())


def plot_robustness(
    entries: Sequence[Mapping[str, Any]],
    levels: Sequence[float],
    noise: str,
    path: str | Path,
    draws: int | None = None,
) -> None:
    """Write :func:`robustness_figure` as a PNG, atomically."""
    _save(robustness_figure(entries, levels, noise, draws), Path(path))


def plot_frontier(
    entries: Sequence[Mapping[str, Any]],
    levels: Sequence[float],
    path: str | Path,
    noise: str = "relative",
) -> None:
    """Write :func:`frontier_figure` as a PNG, atomically."""
    _save(frontier_figure(entries, levels, noise), Path(path))

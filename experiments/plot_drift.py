"""Accuracy against time since programming on PCM: the figure and table of a drift comparison.

    python experiments/plot_drift.py experiments/results/pcm_drift_fashion_mlp

Reads ``comparison.json`` of a ``robusttrain compare`` run whose deployments are one ``pcm`` step each
(t_inference from the step; with and without ``drift_compensation``) and writes beside it
``drift.png`` (two panels, without and with compensation: mean test accuracy over seeds against t on
a log axis, one colour per method, the band the seed-to-seed standard deviation, the clean float
accuracy at the left edge) and ``drift.md`` (the same numbers as a table, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from robusttrain.files import atomic_file, write_atomic  # noqa: E402

# marker and line style per method (with its colour), so that curves that lie close stay apart
STYLES = ["o-", "s--", "^-.", "v:", "D-", "P--", "X-.", "*:", "h-", "<--"]
TIME_LABELS = {1.0: "1 s", 3600.0: "1 h", 86400.0: "1 day", 31536000.0: "1 year"}


def _pcm_step(steps: list[dict]) -> dict:
    pcm = [s for s in steps if s.get("kind") == "pcm"]
    if len(pcm) != 1:
        raise SystemExit(f"a drift comparison needs one pcm step per deployment, got {steps}")
    return pcm[0]


def load(folder: Path) -> tuple[dict, list[str]]:
    """{(method, compensated): {t: entry}} and the methods in the file's order."""
    data = json.loads((folder / "comparison.json").read_text())
    deployments = dict(data["deployments"])
    curves: dict = {}
    methods: list[str] = []
    for entry in data["entries"]:
        step = _pcm_step(deployments[entry["target"]])
        key = (entry["method"], bool(step.get("drift_compensation", False)))
        curves.setdefault(key, {})[float(step.get("t_inference", 1.0))] = entry
        if entry["method"] not in methods:
            methods.append(entry["method"])
    return curves, methods


def plot(curves: dict, methods: list[str], out: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4), sharey=True)
    handles = []
    for ax, compensated in zip(axes, (False, True)):
        for i, method in enumerate(methods):
            points = curves.get((method, compensated))
            if not points:
                continue
            times = sorted(points)
            mean = [100 * points[t]["mean"] for t in times]
            std = [100 * points[t]["std"] for t in times]
            color = plt.cm.tab10(i % 10)
            style = STYLES[i % len(STYLES)]
            (line,) = ax.plot(times, mean, style, color=color, label=method, ms=5, lw=1.6)
            ax.fill_between(times, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.12)
            if not compensated:
                handles.append(line)
        ax.set_xscale("log")
        ax.set_xticks(sorted(TIME_LABELS), [TIME_LABELS[t] for t in sorted(TIME_LABELS)])
        ax.set_xlabel("time since programming (t_inference)")
        ax.set_title("with global drift compensation" if compensated
                     else "without drift compensation")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy on PCM (%), mean over seeds and chips")
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
               title="training\n(band: ±1 std over seeds)")
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)


def table(curves: dict, methods: list[str]) -> str:
    times = sorted({t for points in curves.values() for t in points})
    head = ["method", "clean (float)"] + [
        f"{TIME_LABELS.get(t, f'{t:g} s')}{' comp.' if c else ''}" for c in (False, True)
        for t in times]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        first = next(iter(curves[(method, False)].values()))
        row = [method, f"{100 * first['float_mean']:.2f} ± {100 * first['float_std']:.2f}"]
        for compensated in (False, True):
            points = curves.get((method, compensated), {})
            row += [f"{100 * points[t]['mean']:.2f} ± {100 * points[t]['std']:.2f}"
                    if t in points else "—" for t in times]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="results folder of the drift comparison")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    curves, methods = load(args.folder)
    plot(curves, methods, args.folder / "drift.png", args.title or args.folder.name)
    write_atomic(args.folder / "drift.md", table(curves, methods))
    print(table(curves, methods))


if __name__ == "__main__":
    main()

"""Validation accuracy against wall time, forward-only recipes beside backprop (one panel per network).

    python experiments/single_runs.py --only fashion_mlp_sgd fashion_mlp_zo_node ...   # first
    python experiments/plot_wall_time.py

Reads ``val/acc`` and ``time/fit_s`` (:class:`robusttrain.training.WallClock`: seconds since the
run's training started, logged at every validation) from the newest ``metrics.csv`` of each run
under ``experiments/results/single_runs/runs/``, writes the curves to ``curves.csv`` and draws
``accuracy_vs_time.png`` beside the single-run table (each legend entry ends with the run's final
test accuracy and fit wall time from ``results.csv``). Panels whose runs are missing are skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from robusttrain.files import atomic_file, write_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments/results/single_runs"

#: panel title -> [(run name, label)]: backprop first
PANELS: dict[str, list[tuple[str, str]]] = {
    "Fashion-MNIST, MLP 784-128-10": [
        ("fashion_mlp_sgd", "backprop SGD"),
        ("fashion_mlp_zo_node", "node perturbation (forward only)"),
        ("fashion_mlp_zo_lowrank", "low-rank directions (forward only)"),
    ],
    "MNIST, MLP 784-128-10": [
        ("mnist_mlp_sgd", "backprop SGD"),
        ("mnist_mlp_zo_node", "node perturbation (forward only)"),
    ],
    "Fashion-MNIST, LeNet": [
        ("fashion_cnn_sgd", "backprop SGD"),
        ("fashion_cnn_zo_node", "node perturbation (forward only)"),
    ],
    "CIFAR-10, LeNet": [
        ("cifar10_cnn_sgd", "backprop SGD"),
        ("cifar10_cnn_zo_node", "node perturbation (forward only)"),
    ],
}
STYLES = {"backprop SGD": ("black", "-"), "node perturbation (forward only)": ("tab:red", "-"),
          "low-rank directions (forward only)": ("tab:blue", "--")}


def read_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(seconds, val accuracy) at every validation of the newest version of a run ([] if none)."""
    versions = sorted(run_dir.glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return []
    with open(versions[-1]) as handle:
        rows = list(csv.DictReader(handle))
    return [(float(r["time/fit_s"]), float(r["val/acc"])) for r in rows
            if r.get("time/fit_s") and r.get("val/acc")]


def read_table(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path) as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    table = read_table(args.results / "results.csv")
    curves = {name: read_curve(args.results / "runs" / name)
              for runs in PANELS.values() for name, _ in runs}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "seconds", "val_acc"])
    for name, points in curves.items():
        writer.writerows([name, f"{s:.2f}", f"{a:.4f}"] for s, a in points)
    write_atomic(args.results / "curves.csv", out.getvalue())

    panels = [(title, [(n, lab) for n, lab in runs if curves[n]]) for title, runs in PANELS.items()]
    panels = [(title, runs) for title, runs in panels if len(runs) >= 2]
    if not panels:
        raise SystemExit(f"no run under {args.results / 'runs'} has time/fit_s: run "
                         "experiments/single_runs.py first")
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, runs) in zip(axes.flat, panels):
        for name, label in runs:
            seconds, acc = zip(*curves[name])
            row = table.get(name)
            final = (f": test {100 * float(row['test_acc']):.2f}%, "
                     f"whole fit command {float(row['fit_seconds']):.0f} s" if row else "")
            color, style = STYLES[label]
            ax.plot(seconds, [100 * a for a in acc], style, color=color, marker="o", ms=3,
                    label=label + final)
        ax.set_xscale("log")
        ax.set_xlabel("seconds since training started (log scale), 2-core CPU")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(title, fontsize=10)
        low = min(100 * a for name, _ in runs for _, a in curves[name])
        ax.set_ylim(max(low - 1, 0), None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    fig.suptitle("Accuracy against wall time: one point per epoch", fontsize=11)
    fig.tight_layout()
    with atomic_file(args.results / "accuracy_vs_time.png") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    print(f"wrote {args.results / 'accuracy_vs_time.png'} and curves.csv")


if __name__ == "__main__":
    main()

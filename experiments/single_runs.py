"""The README's single-run figures: train each configuration, then test its final state.

    python experiments/single_runs.py                      # every run below, one after another
    python experiments/single_runs.py --only fashion_mlp_sgd mnist_mlp_zo_lowrank

Each run is ``robusttrain fit --config <config> <overrides>`` into ``<out>/runs/<name>/``, timed
(wall clock of the whole command, start-up and validation included), then ``robusttrain test`` of
its ``checkpoints/last.ckpt`` — the state at the end of the last epoch, which the script checks
(its global step must be the run's last) before reading ``test/acc``. The table is written to
``<out>/results.csv`` and ``<out>/README.md`` (whole files, replaced atomically) after every run,
so an interrupted sweep keeps what it finished; ``--only`` reruns some and keeps the others' rows.

MNIST is read from ``$ROBUSTTRAIN_DATA_DIR`` (or ``./data``); Fashion-MNIST also from Debian's
``dataset-fashion-mnist``. Run nothing else heavy meanwhile: the wall times are part of the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

#: name -> (config, extra command-line overrides)
RUNS: dict[str, tuple[str, list[str]]] = {
    "fashion_mlp_sgd": ("configs/fashion_mlp_sgd.yaml", []),
    "fashion_mlp_zo_nesterov": ("configs/fashion_mlp_zo_nesterov.yaml", []),
    "fashion_mlp_zo_lowrank": ("configs/fashion_mlp_zo_lowrank.yaml", []),
    "fashion_mlp_zo_lowrank_40ep": (
        "configs/fashion_mlp_zo_lowrank.yaml",
        ["--trainer.max_epochs", "40", "--model.init_args.scheduler.init_args.T_max", "40"],
    ),
    "fashion_mlp_zo_lowrank_n512": (
        "configs/fashion_mlp_zo_lowrank.yaml",
        ["--model.init_args.num_pairs", "512", "--model.init_args.optimizer.init_args.lr", "0.008",
         "--trainer.max_epochs", "35", "--model.init_args.scheduler.init_args.T_max", "35"],
    ),
    "mnist_mlp_zo_lowrank": ("configs/mnist_mlp_zo_lowrank.yaml", []),
    "mnist_cnn_zo_lowrank": ("configs/mnist_cnn_zo_lowrank.yaml", []),
    "fashion_cnn_zo_lowrank": ("configs/fashion_cnn_zo_lowrank.yaml", []),
    "fashion_mlp_zo_node": ("configs/fashion_mlp_zo_node.yaml", []),
    "mnist_mlp_sgd": ("configs/mnist_mlp_sgd.yaml", []),
    "mnist_mlp_zo_node": ("configs/mnist_mlp_zo_node.yaml", []),
    "fashion_cnn_sgd": ("configs/fashion_cnn_sgd.yaml", []),
    "fashion_cnn_zo_node": ("configs/fashion_cnn_zo_node.yaml", []),
    "cifar10_cnn_sgd": ("configs/cifar10_cnn_sgd.yaml", []),
    "cifar10_cnn_zo_node": ("configs/cifar10_cnn_zo_node.yaml", []),
}

FIELDS = ["name", "command", "epochs", "global_step", "test_acc", "fit_seconds"]


def _robusttrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "robusttrain", *args]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_test_acc(run_dir: Path) -> float:
    with open(run_dir / "test_last" / "metrics.csv") as handle:
        values = [row["test/acc"] for row in csv.DictReader(handle) if row.get("test/acc")]
    if not values:
        raise RuntimeError(f"{run_dir}/test_last/metrics.csv has no test/acc")
    return float(values[-1])


def run_one(name: str, out: Path) -> dict[str, object]:
    config, overrides = RUNS[name]
    save_dir = out / "runs"
    logger = ["--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.logger.init_args.name", name]
    fit = _robusttrain("fit", "--config", config, *overrides, *logger)
    print(f"[{name}] {' '.join(fit[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(fit, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    run_dir = max((save_dir / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    epochs = checkpoint["epoch"] + 1
    loops = checkpoint["loops"]["fit_loop"]
    if loops["epoch_progress"]["current"]["processed"] != epochs:
        raise RuntimeError(f"{last} is not the end of the run's last epoch")
    test = _robusttrain("test", "--config", config, *overrides, *logger, "--ckpt_path", str(last))
    subprocess.run(test, cwd=ROOT, check=True)
    command = f"robusttrain fit --config {config}" + "".join(f" {a}" for a in overrides)
    return {"name": name, "command": command, "epochs": epochs,
            "global_step": checkpoint["global_step"], "test_acc": round(_read_test_acc(run_dir), 4),
            "fit_seconds": round(seconds, 1)}


def write_tables(rows: list[dict[str, object]], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "results.csv", buffer.getvalue())
    lines = [
        "# Single runs: test accuracy of the final state",
        "",
        "`python experiments/single_runs.py` (2-core CPU). Each row: `robusttrain fit` with the "
        "command shown, then `robusttrain test` of its `checkpoints/last.ckpt`, which is checked "
        "to be the end of the last epoch. Wall time: the whole `fit` command, start-up and "
        "validation included.",
        "",
        "| run | command | epochs | steps | test accuracy | fit wall time |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | `{row['command']}` | {row['epochs']} | {row['global_step']} "
                     f"| {100 * float(row['test_acc']):.2f}% | {float(row['fit_seconds']):.0f} s |")
    _write_atomic(out / "README.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="run only these")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/single_runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, object]] = {}
    if (args.out / "results.csv").exists():
        with open(args.out / "results.csv") as handle:
            rows = {row["name"]: row for row in csv.DictReader(handle)}
    for name in args.only or list(RUNS):
        rows[name] = run_one(name, args.out)
        write_tables([rows[n] for n in RUNS if n in rows], args.out)
    print(f"wrote {args.out / 'README.md'} and {args.out / 'results.csv'}")


if __name__ == "__main__":
    main()

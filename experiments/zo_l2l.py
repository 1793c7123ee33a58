"""The learned zeroth-order optimizer (ZO-L2L) against the hand-designed ones, as in Ruan et al. (2020).

    python experiments/zo_l2l.py                    # all three models (about 45 minutes on 2 cores)
    python experiments/zo_l2l.py --models mnist_mlp # one
    python experiments/zo_l2l.py --models mnist_mlp --meta-seeds 1 2   # + meta-training seeds

Needs the checkpoints of the v2 comparisons (experiments/{mnist_mlp,fashion_mlp,fashion_lenet}_v2.yaml,
run with ``robusttrain compare``). For each model (seed 0 of plain SGD with momentum):

1. meta-train ZO-L2L on its training images (``robusttrain meta-train``), stage 1 (UpdateRNN) into
   ``update.pt``, then stage 2 (QueryRNN, UpdateRNN frozen) from it into ``zo_l2l.pt``;
2. give every hand-designed optimizer the same chance to adapt: its step size is chosen from a grid
   by the mean attack loss after 200 steps on 100 training images (``--split train``);
3. attack the first 100 test images (held out: never seen by meta-training or tuning) of the SGD
   model and of the two models trained on the smoothed loss (noise injection and zeroth-order,
   η_train 0.1; the learned optimizer transfers to them unchanged) for 200 steps (4,201 queries per
   image at q = 10 pairs), every optimizer, into ``experiments/results/zo_l2l_<model>/attack``;
4. write ``summary.md`` there: mean attack loss after 200 steps (± standard error over images), the
   learned optimizer's paired difference to ZO-Adam, and success within the 200 steps;
5. with ``--meta-seeds``, meta-train both stages again with each of those seeds (into
   ``seed<k>/``) and attack the SGD model's test images with them and ZO-Adam, to show how much the
   result depends on the meta-training draws (added to ``summary.md``).

Every step is a ``robusttrain`` command, printed before it runs; finished steps are skipped when
their output exists (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

from robusttrain.evaluation.statistics import level_statistics
from robusttrain.files import write_atomic

RESULTS = Path("experiments/results")
# model -> (comparison whose checkpoints are attacked, ε in L∞)
MODELS = {"mnist_mlp": ("mnist_mlp_v2", 0.1), "fashion_mlp": ("fashion_mlp_v2", 0.05),
          "fashion_lenet": ("fashion_lenet_v2", 0.05)}
GRID = {"zo_sgd": [0.0003, 0.001, 0.003, 0.01, 0.03], "zo_signsgd": [0.001, 0.003, 0.01, 0.03],
        "zo_adam": [0.001, 0.003, 0.01, 0.03], "pgd": [0.003, 0.01, 0.03]}
STEPS, PAIRS = 200, 10
QUERIES = 1 + STEPS * (2 * PAIRS + 1)  # the check of δ_0, then 200 steps of 2q queries + a check


def _run(args: list[str]) -> None:
    print("$ robusttrain " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "robusttrain", *args], check=True)


def _tuned_rates(ckpt: Path, eps: float, out: Path) -> dict[str, float]:
    rates = {}
    for optimizer, grid in GRID.items():
        losses = {}
        for lr in grid:
            folder = out / "tuning" / f"{optimizer}_lr{lr:g}"
            if not (folder / "attack.json").exists():
                _run(["attack", "--ckpt", str(ckpt), "--name", "sgd", "--split", "train",
                      "--images", "100", "--eps", str(eps), "--optimizers", optimizer,
                      "--lr", f"{optimizer}={lr}", "--max-queries", str(QUERIES),
                      "--num-pairs", str(PAIRS), "--out", str(folder)])
            summary = json.loads((folder / "attack.json").read_text())
            losses[lr] = summary["models"]["sgd"][optimizer]["mean_loss_at_step"][str(STEPS)]
        rates[optimizer] = min(losses, key=losses.get)
        print(f"{optimizer}: mean loss after {STEPS} steps on training images "
              + ", ".join(f"lr {lr:g} → {v:.3f}" for lr, v in losses.items())
              + f"; chosen {rates[optimizer]:g}", flush=True)
    rates["nes"] = rates["zo_signsgd"]  # the same step in L∞
    return rates


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n)."""
    stats = level_statistics(values)
    return stats["mean"], stats["std"] / math.sqrt(stats["n"])


def _summary(out: Path, eps: float, rates: dict[str, float]) -> str:
    rows = list(csv.DictReader((out / "attack" / "attack.csv").open()))
    models = list(dict.fromkeys(r["model"] for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    loss = {(r["model"], r["optimizer"], int(r["image"])): float(r["loss_step200"]) for r in rows}
    success = {(r["model"], r["optimizer"], int(r["image"])): int(r["success"]) for r in rows}
    images = sorted({int(r["image"]) for r in rows})
    n = len(images)

    lines = [f"Untargeted L∞ attack, ε = {eps:g}, first {n} test images, {STEPS} steps "
             f"({QUERIES} queries per image, q = {PAIRS} antithetic pairs, σ = 0.001).",
             "Mean margin loss after 200 steps over all images ± standard error over images "
             "(broken images count 0); broken: % of all images within the 200 steps.", "",
             "| optimizer | step size | " + " | ".join(f"{m} loss | {m} broken" for m in models)
             + " |", "|---|---|" + "---|---|" * len(models)]
    for optimizer in optimizers:
        cells = []
        for m in models:
            mu, se = _mean_se([loss[m, optimizer, i] for i in images])
            rate = 100 * sum(success[m, optimizer, i] for i in images) / n
            cells.append(f"{mu:.3f} ± {se:.3f} | {rate:.0f}%")
        lr = "learned" if optimizer not in rates else f"{rates[optimizer]:g}"
        lines.append(f"| {optimizer} | {lr} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference in loss after 200 steps, learned − ZO-Adam (mean ± SE over "
              "images; negative: the learned optimizer got further):", ""]
    for learned in (o for o in optimizers if o not in rates):
        cells = []
        for m in models:
            mu, se = _mean_se([loss[m, learned, i] - loss[m, "zo_adam", i] for i in images])
            cells.append(f"{m} {mu:+.3f} ± {se:.3f}")
        lines.append(f"- {learned}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _meta_seeds(seeds: list[int], common: list[str], sgd: Path, eps: float,
                rates: dict[str, float], out: Path) -> str:
    learned = []
    for seed in seeds:
        folder = out / f"seed{seed}"
        if not (folder / "update.pt").exists():
            _run(["meta-train", *common, "--seed", str(seed), "--stages", "update",
                  "--out", str(folder / "update.pt")])
        if not (folder / "zo_l2l.pt").exists():
            _run(["meta-train", *common, "--seed", str(seed), "--stages", "query",
                  "--init", str(folder / "update.pt"), "--out", str(folder / "zo_l2l.pt")])
        learned += ["--learned", f"zo_l2l_seed{seed}={folder / 'zo_l2l.pt'}"]
    attack = out / "attack_meta_seeds"
    if not (attack / "attack.json").exists():
        _run(["attack", "--eps", str(eps), "--images", "100", "--max-queries", str(QUERIES),
              "--num-pairs", str(PAIRS), "--optimizers", "zo_adam",
              "--lr", f"zo_adam={rates['zo_adam']}", "--ckpt", str(sgd), "--name", "sgd",
              *learned, "--out", str(attack)])
    rows = list(csv.DictReader((attack / "attack.csv").open()))
    adam = {r["image"]: float(r["loss_step200"]) for r in rows if r["optimizer"] == "zo_adam"}
    lines = ["", "Other meta-training seeds, on the SGD model (loss after 200 steps, mean ± SE over "
             "images; paired difference to ZO-Adam):", ""]
    for seed in seeds:
        mine = {r["image"]: float(r["loss_step200"]) for r in rows
                if r["optimizer"] == f"zo_l2l_seed{seed}"}
        m, _ = _mean_se(list(mine.values()))
        d, se = _mean_se([mine[i] - adam[i] for i in adam])
        lines.append(f"- meta-training seed {seed}: loss {m:.3f}, minus ZO-Adam {d:+.3f} ± {se:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--episodes", type=int, default=60, help="meta-training episodes per stage")
    parser.add_argument("--meta-seeds", type=int, nargs="*", default=[],
                        help="more meta-training seeds to run (seed 0 is the main run)")
    args = parser.parse_args()
    for name in args.models:
        comparison, eps = MODELS[name]
        runs = RESULTS / comparison / "runs"
        sgd = runs / "sgd_momentum" / "seed0" / "checkpoints" / "last.ckpt"
        out = RESULTS / f"zo_l2l_{name}"
        common = ["--ckpt", str(sgd), "--eps", str(eps), "--episodes", str(args.episodes),
                  "--iterations", str(STEPS), "--num-pairs", str(PAIRS)]
        if not (out / "update.pt").exists():
            _run(["meta-train", *common, "--stages", "update", "--out", str(out / "update.pt")])
        if not (out / "zo_l2l.pt").exists():
            _run(["meta-train", *common, "--stages", "query", "--init", str(out / "update.pt"),
                  "--out", str(out / "zo_l2l.pt")])
        rates = _tuned_rates(sgd, eps, out)
        if not (out / "attack" / "attack.json").exists():
            _run(["attack", "--eps", str(eps), "--images", "100", "--max-queries", str(QUERIES),
                  "--num-pairs", str(PAIRS),
                  "--lr", ",".join(f"{o}={lr}" for o, lr in rates.items()),
                  "--ckpt", str(sgd), "--name", "sgd",
                  "--ckpt", str(runs / "noise_injection" / "level0.1" / "seed0" / "checkpoints"
                                / "last.ckpt"), "--name", "noise_injection_0.1",
                  "--ckpt", str(runs / "zo_lowrank" / "level0.1" / "seed0" / "checkpoints"
                                / "last.ckpt"), "--name", "zo_lowrank_0.1",
                  "--learned", f"zo_l2l={out / 'zo_l2l.pt'}",
                  "--learned", f"zo_l2l_update_only={out / 'update.pt'}",
                  "--out", str(out / "attack")])
        text = _summary(out, eps, rates)
        if args.meta_seeds:
            text += _meta_seeds(args.meta_seeds, common, sgd, eps, rates, out)
        write_atomic(out / "summary.md", text)
        print(text)


if __name__ == "__main__":
    main()

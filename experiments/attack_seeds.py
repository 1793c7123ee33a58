"""Are models trained on the smoothed loss harder to attack in input space? Three training seeds.

    python experiments/attack_seeds.py     # about 10 minutes on 2 cores

experiments/attacks.sh attacks seed 0 of each v2 comparison with every optimizer; this script adds
seeds 1 and 2 with the best black-box optimizer (ZO-Adam) and the white-box reference (PGD), same
settings (untargeted L∞, first 100 test images, 10,000 queries), into
``experiments/results/attack_<model>_seed<k>/``, and writes
``experiments/results/attack_seeds.md``: per model and training method, the share of the correctly
classified images each attack breaks, mean ± standard deviation over the three seeds, and the
difference to SGD paired by seed. Runs whose output exists are skipped.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from robusttrain.files import write_atomic

RESULTS = Path("experiments/results")
MODELS = {"mnist_mlp": ("mnist_mlp_v2", 0.2), "fashion_mlp": ("fashion_mlp_v2", 0.1),
          "fashion_lenet": ("fashion_lenet_v2", 0.1)}
METHODS = {"sgd": "sgd_momentum", "noise_injection_0.1": "noise_injection/level0.1",
           "zo_lowrank_0.1": "zo_lowrank/level0.1"}
OPTIMIZERS = ("zo_adam", "pgd")


def _folder(model: str, seed: int) -> Path:
    return RESULTS / (f"attack_{model}" if seed == 0 else f"attack_{model}_seed{seed}")


def _attack(model: str, seed: int) -> None:
    comparison, eps = MODELS[model]
    args = ["attack", "--eps", str(eps), "--images", "100", "--max-queries", "10000",
            "--optimizers", ",".join(OPTIMIZERS), "--out", str(_folder(model, seed))]
    for name, path in METHODS.items():
        args += ["--ckpt", str(RESULTS / comparison / "runs" / path / f"seed{seed}" /
                               "checkpoints" / "last.ckpt"), "--name", name]
    print("$ robusttrain " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "robusttrain", *args], check=True)


def main() -> None:
    rates: dict[tuple[str, str, str], list[float]] = {}
    for model in MODELS:
        for seed in (0, 1, 2):
            if not (_folder(model, seed) / "attack.json").exists():
                _attack(model, seed)
            summary = json.loads((_folder(model, seed) / "attack.json").read_text())["models"]
            for method in METHODS:
                for optimizer in OPTIMIZERS:
                    rate = summary[method][optimizer]["success_rate_on_correct"]
                    rates.setdefault((model, method, optimizer), []).append(100 * rate)
    lines = ["Images broken (% of the first 100 test images the model classifies right), "
             "untargeted L∞, 10,000 queries; mean ± std over training seeds 0, 1, 2; Δ: paired "
             "by seed, minus SGD (mean ± std).", "",
             "| model | ε | method | ZO-Adam | Δ ZO-Adam | PGD | Δ PGD |",
             "|---|---|---|---|---|---|---|"]
    for model, (_, eps) in MODELS.items():
        for method in METHODS:
            cells = []
            for optimizer in OPTIMIZERS:
                mine = rates[model, method, optimizer]
                diff = [a - b for a, b in zip(mine, rates[model, "sgd", optimizer])]
                cells.append(f"{statistics.mean(mine):.1f} ± {statistics.stdev(mine):.1f}")
                cells.append("—" if method == "sgd" else
                             f"{statistics.mean(diff):+.1f} ± {statistics.stdev(diff):.1f}")
            lines.append(f"| {model} | {eps:g} | {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_atomic(RESULTS / "attack_seeds.md", text)
    print(text)


if __name__ == "__main__":
    main()

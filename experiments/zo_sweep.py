"""Sweep zeroth-order training settings quickly: a plain loop over the population engine.

    python experiments/zo_sweep.py --data fashion_mnist --data-dir /usr/share/datasets/fashion-mnist \\
        --run "mode=shared pairs=64 batch=256 lr=0.002" --run "mode=split pairs=512 batch=1024" \\
        --out experiments/results/zo_sweep/fashion_mlp.jsonl

Each ``--run`` is one training run from the same initialization (seed 0): the engine's estimate
(`population_smoothed_grad`) feeds SGD-Nesterov or Adam with a cosine learning rate over the
planned epochs, on the first 55,000 training images (the DataModules' training split); test
accuracy, wall time and the largest |w| of a weight matrix are printed as they finish and appended
to ``--out`` as JSON lines (one object a run, written whole). It skips Lightning's machinery
(validation, logging, checkpoints), so it runs faster than ``robusttrain fit`` and measures only the
estimator and the optimizer; the chosen settings then go into a config under ``configs/`` and are
confirmed with ``robusttrain fit``.

Keys of ``--run`` (defaults in brackets): model [mlp] (mlp: 784-128-10, lenet), mode [shared]
(shared | split), pairs [64], batch [256], perturbation [lowrank], rank [1], sigma [0.01],
lr [0.002], optimizer [nesterov] (nesterov | adam), weight_decay [0], shaping [none]
(none | centered_ranks | zscore), epochs [5].
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robusttrain.data import load_arrays
from robusttrain.data.sources import dataset_spec
from robusttrain.models import MLP, LeNet
from robusttrain.zo.population import population_smoothed_grad

DEFAULTS = {"model": "mlp", "mode": "shared", "pairs": 64, "batch": 256,
            "perturbation": "lowrank", "rank": 1, "sigma": 0.01, "lr": 0.002,
            "optimizer": "nesterov", "weight_decay": 0.0, "shaping": "none", "epochs": 5.0}
TRAIN_SIZE = 55000


def parse_run(text: str) -> dict:
    run = dict(DEFAULTS)
    for item in text.split():
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown key {key!r} in --run {text!r}; keys: {', '.join(DEFAULTS)}")
        run[key] = type(DEFAULTS[key])(value)
    return run


def tensors(dataset: str, data_dir: str) -> tuple[torch.Tensor, ...]:
    arrays = load_arrays(dataset, data_dir)
    spec = dataset_spec(dataset)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def images(a):
        return (torch.from_numpy(a.copy()).float() / 255 - mean) / std

    def labels(a):
        return torch.from_numpy(a.astype("int64"))

    return (images(arrays["train_x"])[:TRAIN_SIZE], labels(arrays["train_y"])[:TRAIN_SIZE],
            images(arrays["test_x"]), labels(arrays["test_y"]))


def train(run: dict, data: tuple[torch.Tensor, ...]) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = MLP(784, [128], 10) if run["model"] == "mlp" else LeNet(x_train.shape[1], 10)
    params = list(model.parameters())
    if run["optimizer"] == "adam":
        optimizer = torch.optim.Adam(params, lr=run["lr"], weight_decay=run["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=run["lr"], momentum=0.9, nesterov=True,
                                    weight_decay=run["weight_decay"])
    steps_per_epoch = TRAIN_SIZE // run["batch"]
    total = int(run["epochs"] * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    order = torch.Generator().manual_seed(0)
    step = 0
    start = time.perf_counter()
    while step < total:
        perm = torch.randperm(TRAIN_SIZE, generator=order)
        for i in range(min(steps_per_epoch, total - step)):
            rows = perm[i * run["batch"] : (i + 1) * run["batch"]]
            estimate = population_smoothed_grad(
                model, x_train[rows], y_train[rows], sigma=run["sigma"], num_pairs=run["pairs"],
                seed=step, perturbation=run["perturbation"], rank=run["rank"],
                batch_mode=run["mode"], fitness_shaping=run["shaping"],
            )
            for p, g in zip(params, estimate.grads):
                p.grad = g
            optimizer.step()
            schedule.step()
            step += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        correct = sum(int((model(x_test[i : i + 2000]).argmax(1) == y_test[i : i + 2000]).sum())
                      for i in range(0, len(y_test), 2000))
    return {**run, "steps": step, "test_acc": round(100 * correct / len(y_test), 2),
            "seconds": round(seconds, 1),
            "max_abs_w": round(max(float(p.abs().max()) for p in params if p.dim() > 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    parser.add_argument("--data-dir", required=True, help="folder with the dataset's IDX files")
    parser.add_argument("--run", action="append", required=True, help="one run's settings")
    parser.add_argument("--out", help="append results here as JSON lines")
    args = parser.parse_args()
    runs = [parse_run(text) for text in args.run]
    data = tensors(args.data, args.data_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.data}")
    for run in runs:
        result = {"data": args.data, **train(run, data)}
        print(json.dumps(result), flush=True)
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:  # one whole line per run
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

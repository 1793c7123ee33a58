"""Speed and memory of one smoothed-gradient estimate against plain forwards, backprop and EvoTorch.

    python experiments/bench_estimator.py            # full run (about 6 minutes on 2 cores)
    python experiments/bench_estimator.py --quick    # under a minute, to check that it runs

For the Fashion-MNIST MLP (784-128-10) and the LeNet CNN on a batch of 256 it prints the median
time of one estimate (noise generation included), each measured side by side in the same process
with its reference:

* Gaussian directions, N = 16 and 64 pairs, through the in-place loop (`estimate_smoothed_grad`)
  and the population engine (`population_smoothed_grad`), against 2N plain forward passes of the
  same model on the same batch (the forward-pass limit of the loop);
* rank-1 low-rank directions, N = 1,024 pairs (LeNet: 256), every pair on the whole batch
  (`shared`), against 2N plain forward passes;
* rank-1 low-rank directions, N = 128 pairs, each on its own 2 of the 256 examples (`split`),
  against one backprop step (forward + backward) on the same batch;

and the peak resident memory of a fresh process doing only that (VmHWM from /proc, so it includes
the interpreter and torch, about 300 MB; compare with the forward-only rows; the engine evaluates
pairs in chunks of about 16,384 member rows, so its memory stops growing with N once N·B passes
that). When EvoTorch is installed (`pip install 'robusttrain[evotorch]'`), it times one PGPE step
with symmetric sampling (population 2N) on the same network and batch in the same run.

Inputs are the first 256 Fashion-MNIST test images (read from FASHION_DIR with a tiny IDX reader),
or, with --random, random tensors of the same shape (timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from robusttrain.models import MLP, LeNet
from robusttrain.zo.estimators import estimate_smoothed_grad
from robusttrain.zo.population import population_smoothed_grad

BATCH = 256
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(784, [128], 10) if name == "mlp" else LeNet(1, 10)


def read_idx(path: str, count: int, header: int) -> torch.Tensor:
    """The first ``count`` records of a gzipped IDX file (images: 16-byte header, labels: 8)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    record = 28 * 28 if header == 16 else 1
    return torch.frombuffer(bytearray(data[header : header + count * record]), dtype=torch.uint8)


def batch(random: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if random:
        g = torch.Generator().manual_seed(0)
        return (torch.randn(BATCH, 1, 28, 28, generator=g),
                torch.randint(0, 10, (BATCH,), generator=g))
    images = read_idx(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"), BATCH, 16)
    labels = read_idx(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"), BATCH, 8)
    x = (images.float().view(BATCH, 1, 28, 28) / 255.0 - 0.2860) / 0.3530
    return x, labels.long()


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# (path, family, batch mode) of each estimator row; "forward" and "backprop" are the references
ESTIMATES = {
    "loop": ("gaussian", "shared"),
    "batched": ("gaussian", "shared"),
    "lowrank": ("lowrank", "shared"),
    "split": ("lowrank", "split"),
}


def run_case(model_name: str, path: str, pairs: int, repeats: int, random: bool = False) -> float:
    model = build(model_name).eval()
    x, y = batch(random)
    params = list(model.parameters())
    seed = iter(range(10**9))
    if path == "forward":
        def fn():
            with torch.no_grad():
                for _ in range(2 * pairs):
                    model(x)
    elif path == "backprop":
        def fn():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    elif path == "loop":
        def fn():
            estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, sigma=0.01,
                                   num_pairs=pairs, seed=next(seed))
    elif path in ESTIMATES:
        perturbation, batch_mode = ESTIMATES[path]

        def fn():
            population_smoothed_grad(model, x, y, sigma=0.01, num_pairs=pairs, seed=next(seed),
                                     perturbation=perturbation, rank=1, batch_mode=batch_mode)
    elif path == "evotorch":
        fn = evotorch_step(model, x, y, pairs)
    else:
        raise ValueError(path)
    return median_time(fn, repeats)


def evotorch_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pairs: int):
    """One PGPE generation (symmetric sampling, population 2N) on the same network and batch."""
    from evotorch.algorithms import PGPE
    from evotorch.neuroevolution import SupervisedNE
    from torch.utils.data import TensorDataset

    problem = SupervisedNE(
        TensorDataset(x, y), model, torch.nn.CrossEntropyLoss(), minibatch_size=BATCH,
        num_minibatches=1, common_minibatch=True,
    )
    searcher = PGPE(problem, popsize=2 * pairs, center_learning_rate=0.01,
                    stdev_learning_rate=0.1, stdev_init=0.01, symmetric=True)
    return searcher.step


def peak_memory_mb(model_name: str, path: str, pairs: int, random: bool) -> float:
    """VmHWM of a fresh process that runs the case a few times."""
    code = (
        "import sys; sys.path.insert(0, 'experiments');"
        "import bench_estimator as b;"
        f"b.run_case({model_name!r}, {path!r}, {pairs}, 3, {random});"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, fewer pairs, no EvoTorch or memory figures")
    parser.add_argument("--random", action="store_true",
                        help="random inputs of the same shape instead of Fashion-MNIST")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    repeats = 2 if args.quick else 9
    try:
        import evotorch  # noqa: F401

        logging.getLogger("evotorch").setLevel(logging.WARNING)

        have_evotorch = True
    except ImportError:
        have_evotorch = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"EvoTorch {'installed' if have_evotorch else 'not installed'}")
    print(f"{'model':6} {'path':9} {'N':>5} {'median ms':>10} {'reference':>16} {'ratio':>7} "
          f"{'peak MB':>8} {'EvoTorch / this':>16}")
    # (reference, [(path, pairs)]): each group is timed side by side with its reference
    results = []
    for model_name in ["mlp", "cnn"]:
        groups = [("forward", pairs, ["loop", "batched"])
                  for pairs in ([16] if args.quick else [16, 64])]
        # LeNet's 2N member activations are large: N = 256 keeps the full run within minutes
        lowrank_pairs = 64 if args.quick else (1024 if model_name == "mlp" else 256)
        groups.append(("forward", lowrank_pairs, ["lowrank"]))
        groups.append(("backprop", 128, ["split"]))
        for reference, pairs, paths in groups:
            few = max(2, repeats // 3) if pairs >= 1024 else repeats
            ref = run_case(model_name, reference, pairs, few, args.random)
            evo = run_case(model_name, "evotorch", pairs, max(1, repeats // 3), args.random) \
                if have_evotorch and not args.quick and reference == "forward" \
                and "loop" in paths else None
            label = f"2N={2 * pairs} fwd" if reference == "forward" else "1 backprop step"
            rows = [(reference, ref)] + [
                (p, run_case(model_name, p, pairs, few, args.random)) for p in paths]
            if evo is not None:
                rows.append(("evotorch", evo))
            for path, seconds in rows:
                mem = None if args.quick else peak_memory_mb(model_name, path, pairs, args.random)
                ratio_evo = f"{evo / seconds:16.1f}" if evo and path in paths else " " * 16
                print(f"{model_name:6} {path:9} {pairs:5d} {1000 * seconds:10.1f} {label:>16} "
                      f"{seconds / ref:7.3f} {'' if mem is None else f'{mem:8.0f}'} "
                      f"{ratio_evo}", flush=True)
                results.append({"model": model_name, "pairs": pairs, "path": path,
                                "median_s": seconds, "reference": reference,
                                "ratio_to_reference": seconds / ref, "peak_mb": mem,
                                "evotorch_over_this": (evo / seconds) if evo else None})
    if args.json:
        # atomic: a temporary file in the same directory, then os.replace
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()

"""Data- against population-parallel zeroth-order training: bytes exchanged and step time.

    python experiments/bench_parallel.py                 # Fashion-MNIST MLP, 1 and 2 processes
    python experiments/bench_parallel.py --processes 1 2 --out experiments/results/bench_parallel

For every (directions, mode, processes) it trains ``--steps`` measured steps (after ``--warmup``)
of the Fashion-MNIST MLP 784-128-10 at batch 256 with Lightning's DDP strategy on CPU processes
(gloo), and prints:

* bytes per step and process, *measured*: every call of a ``torch.distributed`` collective in
  every process is counted with the bytes of the tensors it was given (``all_reduce``: the
  tensor; ``all_gather_into_tensor``: the input; ``broadcast``: the tensor), split into the
  estimator's exchange and Lightning's own per-step broadcast (its SIGTERM flag);
* the mean wall time of a step (``on_train_batch_start`` to ``on_train_batch_end``: the clean
  pass, the estimate, the exchange and the optimizer step), with the machine's cores split evenly
  between the processes (``torch.set_num_threads``).

In data mode each process evaluates all 2N members on its 256/W examples and all-reduces a
d-float estimate; in population mode it evaluates its share of the pairs on all 256 and
all-gathers 2N float64 losses (docs/scaling.md). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer

from robusttrain.data import FashionMNISTDataModule
from robusttrain.models import MLP
from robusttrain.training import ZerothOrderClassifier

SETTINGS = {  # directions -> (num_pairs, lr): the recipes of configs/fashion_mlp_zo_*.yaml
    "gaussian": (64, 0.002),
    "lowrank": (256, 0.004),
}
_COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast",
                "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter", "reduce")


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


_ACTIVE: CollectiveMeter | None = None  # the meter of the run going on in this process


def _metered(name: str, original):
    """``original`` (a torch.distributed collective) reporting its bytes to the active meter."""

    def call(*args, **kwargs):
        if _ACTIVE is not None:
            # the tensor handed in: the first argument, except for all_gather_into_tensor
            # (output, input) and all_gather (list of outputs, input)
            given = args[1] if name.startswith("all_gather") else args[0]
            _ACTIVE.record(name, _nbytes(given), _from_robusttrain())
        return original(*args, **kwargs)

    call._metered = True
    return call


def _from_robusttrain() -> bool:
    """Whether the collective was called on behalf of robusttrain's training step (the estimator's
    exchange) rather than by Lightning's own bookkeeping (stop flags, logging)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"robusttrain{os.sep}training" in name or f"robusttrain{os.sep}zo" in name:
            return True
        frame = frame.f_back
    return False


class CollectiveMeter(Callback):
    """Counts the bytes handed to torch.distributed collectives and times the training steps."""

    def __init__(self, warmup: int, out: str) -> None:
        self.warmup, self.out = warmup, out
        self.calls: dict[str, list[int]] = {}
        self.step_times: list[float] = []
        self._measuring = False
        self._started = 0.0

    def setup(self, trainer, pl_module, stage) -> None:
        global _ACTIVE
        threads = max(1, (os.cpu_count() or 1) // trainer.world_size)
        torch.set_num_threads(threads)
        self.threads = threads
        _ACTIVE = self
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None and not getattr(original, "_metered", False):
                setattr(dist, name, _metered(name, original))

    def record(self, name: str, nbytes: int, estimator: bool) -> None:
        if self._measuring:
            key = name if estimator else f"lightning:{name}"
            self.calls.setdefault(key, []).append(nbytes)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._measuring = trainer.global_step >= self.warmup
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._measuring:
            self.step_times.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer, pl_module) -> None:
        self._measuring = False
        steps = len(self.step_times)
        record = {
            "rank": trainer.global_rank, "threads": self.threads, "steps": steps,
            "step_seconds": sum(self.step_times) / max(1, steps),
            "bytes_per_step": {k: sum(v) / max(1, steps) for k, v in self.calls.items()},
            "calls_per_step": {k: len(v) / max(1, steps) for k, v in self.calls.items()},
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(record, handle)


def run(directions: str, mode: str, processes: int, steps: int, warmup: int) -> dict:
    num_pairs, lr = SETTINGS[directions]
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        model = ZerothOrderClassifier(
            MLP(784, [128], 10), num_pairs=num_pairs, sigma=0.01, perturbation=directions,
            parallel=mode, optimizer=_optimizer(lr))
        meter = CollectiveMeter(warmup, out)
        trainer = Trainer(
            accelerator="cpu", devices=processes, strategy="ddp_spawn" if processes > 1 else "auto",
            max_steps=warmup + steps, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=mode == "data", callbacks=[meter], default_root_dir=out,
        )
        trainer.fit(model, datamodule=FashionMNISTDataModule(batch_size=256))
        records = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(processes)]
    return {
        "directions": directions, "num_pairs": num_pairs, "mode": mode, "processes": processes,
        "threads_per_process": records[0]["threads"],
        "parameters": sum(p.numel() for p in model.backbone.parameters()),
        "step_ms": 1000 * max(r["step_seconds"] for r in records),
        "bytes_per_step": records[0]["bytes_per_step"],
        "calls_per_step": records[0]["calls_per_step"],
    }


class _Optimizer:
    """A picklable optimizer factory (spawned processes receive the model by pickling)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __call__(self, params):
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, nesterov=True)


def _optimizer(lr: float) -> _Optimizer:
    return _Optimizer(lr)


def _bytes(result: dict, lightning: bool) -> float:
    return sum(v for k, v in result["bytes_per_step"].items()
               if k.startswith("lightning:") == lightning)


def _calls(result: dict, lightning: bool) -> str:
    calls = {k.removeprefix("lightning:"): v for k, v in result["calls_per_step"].items()
             if k.startswith("lightning:") == lightning}
    return ", ".join(f"{v:g} × {k}" for k, v in sorted(calls.items())) or "none"


def table(results: list[dict]) -> str:
    lines = [
        "| directions | N | mode | processes × threads | step time | estimator's exchange per step "
        "and process | Lightning's own per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['directions']} | {r['num_pairs']} | {r['mode']} | {r['processes']} × "
            f"{r['threads_per_process']} | {r['step_ms']:.1f} ms | {_bytes(r, False):,.0f} B "
            f"({_calls(r, False)}) | {_bytes(r, True):,.0f} B ({_calls(r, True)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--directions", nargs="+", default=sorted(SETTINGS), choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write results.json and results.md here")
    args = parser.parse_args(argv)
    results = []
    for directions in args.directions:
        for mode in ("data", "population"):
            for processes in args.processes:
                result = run(directions, mode, processes, args.steps, args.warmup)
                results.append(result)
                print(json.dumps(result), flush=True)
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "results.md").write_text(
            f"`python experiments/bench_parallel.py --processes {' '.join(map(str, args.processes))}"
            f" --steps {args.steps}` on {os.cpu_count()} CPU cores, Fashion-MNIST MLP "
            f"(d = {results[0]['parameters']:,}), batch 256.\n\n{text}\n")


if __name__ == "__main__":
    main()

r"""How close each forward-only estimator comes to ∇L_σ, and at what price: the estimators' benchmark.

    python experiments/bench_variance.py                 # full run (see "Duration" below)
    python experiments/bench_variance.py --quick         # MLP, short N lists, M = 256, R = 2
    python experiments/bench_variance.py --networks mlp --states init --repeats 16
    python experiments/bench_variance.py --checkpoint mlp=runs/x/checkpoints/last.ckpt

For the Fashion-MNIST MLP (784-128-10) and LeNet (1×28×28), at initialization
(``torch.manual_seed(0)``) and at a trained state, on one fixed batch of B = 256 training images
(the first 256 of a permutation drawn with seed 0), it measures every estimator of the gradient of
the smoothed loss L_σ(θ) = E_ε[L(θ + σε)], ε ~ N(0, I), σ absolute (--sigma, default 0.01):

* the reference ∇L_σ: reparameterized backprop, the mean of ∇L(θ + σε) over M draws
  (--reference-draws, default 4,096), taken in antithetic pairs ±ε (still unbiased; the pair mean
  cancels the part of ∇L that is linear in ε), with ``torch.func.vmap(grad(...))`` over chunks of
  8 pairs for the MLP and a plain loop of autograd calls for LeNet (faster on a CPU). Its own
  relative MSE is estimated as tr(Cov)/(K‖mean‖²) from the K = M/2 pair means; it should be under
  2% of the smallest relative MSE of a forward-only estimator in the same table, and a WARNING
  line says when it is not (raise --reference-draws);
* the forward-only estimators, at several numbers of antithetic pairs N, R repeats each (seeds
  0..R−1, --repeats, default 8), each through the path robusttrain's ZerothOrderClassifier takes on
  a CPU (``population_smoothed_grad`` when ``choose_population(model, "cpu")``, else the in-place
  loop ``estimate_smoothed_grad``):
  ``gaussian`` (N = 16, 64, 256), ``lowrank`` rank 1 (N = 16, 64, 256), ``orthogonal`` Gaussian
  directions (N = 16, 64, 256) and ``node`` perturbation (``node_smoothed_grad``, N = 1, 4, 16);
* ``backprop``, for scale only (NOT forward-only): the plain gradient ∇L(θ) of the batch taken as
  an estimate of ∇L_σ; its relative MSE is the smoothing bias alone.

Columns: the relative MSE ‖ĝ − ∇L_σ‖²/‖∇L_σ‖² (mean ± standard error over the repeats; it
includes the reference's own relative MSE, which is why that must be small), the mean cosine with
the reference, the cost in forward-pass equivalents (2N member passes of the whole batch, for every
estimator) and in milliseconds (median wall time of one estimate after one warm-up call, with
--threads torch threads, default torch's), and the figures of merit relMSE × forward passes and
relMSE × ms (lower is better: the relative MSE that one forward pass, or one ms, of budget buys).
Below each table, each layer's part of the relative MSE at N = 16: which layers node perturbation
helps, and by how much (Linear layers, projected onto their outputs), and which it helps less
(conv kernels, whose per-example draws stay in weight space).

The trained state is the backbone trained with backprop (Adam, lr 1e-3, batch 128, --train-epochs,
default 2, seed 0) on the whole training set inside the script; its state_dict is cached as
``<cache>/<network>_adam_epochs<E>.pt`` (--cache, default runs/bench_variance) and reused. Or give
a robusttrain Lightning checkpoint: ``--checkpoint mlp=PATH`` (repeatable, one per network).

Outputs under --out (default runs/bench_variance), each written whole: results.csv (one row per
network, state, estimator and N), results.md (one table per network and state, sorted by
relMSE × forward passes), results.json (settings, references, rows) and variance.png (relative MSE
against cost in forward passes, log–log, one panel per network and state).

Duration, on a shared 2-core CPU with 2 torch threads (estimated from --quick timings): --quick
about 15 s (the MLP: a reference of 256 draws in about a second, every estimate under 0.2 s); the
full run about 8 to 10 minutes: the MLP under a minute for both states, LeNet about 3.5 minutes per
state, of which about a minute is its reference (4,096 backprops of the batch, 16 ms each) and
most of the rest its N = 256 rows (the in-place loop: 512 forward passes of the batch, about 4 s,
nine times for each of gaussian, lowrank and orthogonal).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from robusttrain.data.sources import DATASETS, load_arrays
from robusttrain.files import atomic_file, write_atomic
from robusttrain.models import MLP, LeNet
from robusttrain.zo.estimators import estimate_smoothed_grad
from robusttrain.zo.node import node_smoothed_grad
from robusttrain.zo.population import choose_population, population_smoothed_grad

BATCH = 256
NETWORKS = ("mlp", "lenet")
STATES = ("init", "trained")
ESTIMATORS = ("gaussian", "lowrank", "orthogonal", "node")
# N, the antithetic pairs of each estimate (node's pairs are per example: far fewer are needed)
PAIRS: dict[str, tuple[int, ...]] = {
    "gaussian": (16, 64, 256), "lowrank": (16, 64, 256), "orthogonal": (16, 64, 256),
    "node": (1, 4, 16),
}
QUICK_PAIRS: dict[str, tuple[int, ...]] = {
    "gaussian": (16, 64), "lowrank": (16, 64), "orthogonal": (16, 64), "node": (4, 16),
}
LAYER_PAIRS = 16  # the per-layer table compares the estimators at this N, the one they all share
REFERENCE_SEED = 1_000_003  # the reference's draws: a stream of their own, apart from seeds 0..R−1
REFERENCE_SHARE = 0.02  # the reference's relative MSE must stay under 2% of the smallest in a table
TITLES = {"mlp": "MLP 784-128-10", "lenet": "LeNet", "init": "at initialization",
          "trained": "trained"}
STYLE = {  # one colour and marker per estimator, in every panel
    "gaussian": ("tab:blue", "o"),
    "lowrank": ("tab:orange", "s"),
    "orthogonal": ("tab:green", "^"),
    "node": ("tab:red", "D"),
}
COLUMNS = ("network", "state", "estimator", "forward_only", "path", "num_pairs", "repeats",
           "rel_mse", "rel_mse_se", "cosine", "cost_forward", "ms", "rel_mse_x_forward",
           "rel_mse_x_ms", "sigma", "batch", "reference_draws", "reference_rel_mse", "threads")

Data = tuple[torch.Tensor, torch.Tensor]  # normalized training images (n, 1, 28, 28), labels (n,)


@dataclass
class Reference:
    """The reference ∇L_σ of one network and state, flattened in ``model.parameters()`` order."""

    grad: torch.Tensor  # (P,) float64
    draws: int  # gradient evaluations: 2 × the antithetic pairs
    rel_mse: float  # tr(Cov)/(K‖mean‖²) over the K pair means: its own relative MSE
    seconds: float


@dataclass
class Row:
    """One line of results.csv (None: does not apply, an empty cell)."""

    network: str
    state: str
    estimator: str
    forward_only: bool
    path: str  # population | loop | node | autograd
    num_pairs: int | None
    repeats: int
    rel_mse: float
    rel_mse_se: float | None
    cosine: float
    cost_forward: int | None
    ms: float
    rel_mse_x_forward: float | None
    rel_mse_x_ms: float
    sigma: float
    batch: int
    reference_draws: int
    reference_rel_mse: float
    threads: int


@dataclass
class Layer:
    """One layer with parameters: where in the flat vector its entries sit, and its size."""

    name: str
    kind: str  # Linear | Conv2d
    entries: int  # weights and bias
    outputs: int  # out_features | out_channels
    start: int
    stop: int


def layers_of(model: nn.Module) -> list[Layer]:
    """The layers with trainable parameters, in ``model.parameters()`` order (each layer's
    parameters are contiguous there)."""
    layers, offset = [], 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        size = sum(p.numel() for p in own)
        outputs = getattr(module, "out_features", None) or getattr(module, "out_channels", 0)
        layers.append(Layer(name, type(module).__name__, size, outputs, offset, offset + size))
        offset += size
    return layers


@dataclass
class Panel:
    """Everything measured for one network in one state."""

    network: str
    state: str
    source: str  # how the weights were obtained
    loss: float  # L(θ) on the batch
    reference: Reference
    rows: list[Row] = field(default_factory=list)
    warning: str | None = None
    layers: list[Layer] = field(default_factory=list)
    # (estimator, N) → each layer's share of the relative MSE, ‖ĝ_l − ∇_l L_σ‖²/‖∇L_σ‖², mean over
    # the repeats, in the order of ``layers``: the shares add up to the row's relative MSE
    layer_rel_mse: dict[tuple[str, int], list[float]] = field(default_factory=dict)


# ----- data and networks ------------------------------------------------------------------------
def load_fashion() -> Data:
    """The Fashion-MNIST training set, normalized as the DataModules do: (pixel/255 − mean)/std."""
    arrays = load_arrays("fashion_mnist", None)
    spec = DATASETS["fashion_mnist"]
    x = torch.from_numpy(arrays["train_x"].copy()).to(torch.float32).div_(255.0)
    x = x.sub_(spec.mean[0]).div_(spec.std[0])
    return x, torch.from_numpy(arrays["train_y"].copy()).long()


def fixed_batch(data: Data) -> Data:
    """The first B images of a permutation of the training set drawn with seed 0."""
    x, y = data
    if len(x) < BATCH:
        raise ValueError(f"the benchmark batch needs {BATCH} training images, got {len(x)}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:BATCH]
    return x[order].contiguous(), y[order].contiguous()


def build(network: str) -> nn.Module:
    """The backbone at its initialization: ``torch.manual_seed(0)``, then the constructor."""
    torch.manual_seed(0)
    return MLP(784, [128], 10) if network == "mlp" else LeNet()


def train_backprop(network: str, data: Data, epochs: int) -> nn.Module:
    """Adam (lr 1e-3), batches of 128 in an order drawn with seed 0, ``epochs`` passes."""
    model = build(network).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(128):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def trained_state(network: str, data: Data, epochs: int, cache: Path,
                  checkpoints: dict[str, str]) -> tuple[nn.Module, str]:
    """The trained backbone and where it came from: a checkpoint, the cache, or training now."""
    model = build(network)
    if network in checkpoints:
        from robusttrain.training.checkpoints import load_checkpoint

        given = checkpoints[network]
        loaded = load_checkpoint(given, option="--checkpoint")
        if type(loaded.backbone) is not type(model) or {
            k: v.shape for k, v in loaded.backbone.state_dict().items()
        } != {k: v.shape for k, v in model.state_dict().items()}:
            raise SystemExit(f"--checkpoint {network}={given}: its backbone "
                             f"({type(loaded.backbone).__name__}, spec "
                             f"{getattr(loaded.backbone, 'spec', '?')}) is not the benchmark's "
                             f"{network} ({getattr(model, 'spec', '?')})")
        dataset = loaded.data.get("dataset")
        if dataset not in (None, "fashion_mnist"):
            print(f"WARNING: --checkpoint {network}={given} was trained on {dataset}, not "
                  "fashion_mnist", flush=True)
        model.load_state_dict(loaded.backbone.state_dict())
        return model.eval(), f"checkpoint {given}"
    path = cache / f"{network}_adam_epochs{epochs}.pt"
    source = f"backprop, Adam lr 1e-3, batch 128, {epochs} epochs, seed 0"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("train_images") == len(data[0]):
            model.load_state_dict(stored["state_dict"])
            return model.eval(), f"{source} (cached: {path})"
    start = time.perf_counter()
    model = train_backprop(network, data, epochs)
    print(f"  trained {network} for {epochs} epochs in {time.perf_counter() - start:.1f} s, "
          f"cached as {path}", flush=True)
    with atomic_file(path) as f:
        torch.save({"state_dict": model.state_dict(), "network": network, "epochs": epochs,
                    "train_images": len(data[0])}, f)
    return model, source


# ----- the reference ----------------------------------------------------------------------------
def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of all entries, in order."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def reference_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigma: float,
                       draws: int, chunk: int) -> Reference:
    """Mean of ∇L(θ + σε) over ``draws`` draws in antithetic pairs, with its own relative MSE.

    ``chunk`` pairs (2·chunk gradients) go through one ``vmap(grad(...))`` call; with ``chunk``
    1, a plain loop of autograd calls (faster on a CPU for LeNet, whose batched convolutions
    become grouped ones under vmap: 16 ms a draw in a loop against 24 to 37 with vmap).
    """
    start = time.perf_counter()
    names = [n for n, _ in model.named_parameters()]
    clean = [p.detach() for _, p in model.named_parameters()]

    def loss(params: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)

    batched = vmap(grad(loss))

    def gradients(members: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇L at each of the stacked parameter sets (m, …) → one (m, …) tensor per parameter."""
        if chunk > 1:
            return list(batched(tuple(members)))
        each = []
        for j in range(members[0].shape[0]):
            point = [m[j].detach().requires_grad_() for m in members]
            each.append(torch.autograd.grad(loss(point), point))
        return [torch.stack(g) for g in zip(*each)]

    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    pairs = max(2, draws // 2)
    total = torch.zeros(sum(p.numel() for p in clean), dtype=torch.float64)
    squares = torch.zeros_like(total)
    for first in range(0, pairs, chunk):
        k = min(chunk, pairs - first)
        noise = [torch.randn(k, *p.shape, generator=generator) for p in clean]
        # members (2k, …): the k draws at +σε, then the same k at −σε
        members = [torch.cat([p + sigma * e, p - sigma * e]) for p, e in zip(clean, noise)]
        pair_means = torch.cat([g.reshape(2, k, -1).double().mean(0) for g in gradients(members)],
                               dim=1)
        total += pair_means.sum(0)
        squares += pair_means.square().sum(0)
    mean = total / pairs
    variance = (squares - pairs * mean.square()).clamp_min(0) / (pairs - 1)
    rel_mse = float(variance.sum() / (pairs * mean.square().sum()))
    return Reference(mean, 2 * pairs, rel_mse, time.perf_counter() - start)


# ----- the estimators ---------------------------------------------------------------------------
def estimator_call(model: nn.Module, x: torch.Tensor, y: torch.Tensor, estimator: str,
                   num_pairs: int, sigma: float) -> tuple[str, Callable[[int], list[torch.Tensor]]]:
    """The path robusttrain's ZerothOrderClassifier takes on a CPU, and seed → estimate."""
    if estimator == "node":
        def node(seed: int) -> list[torch.Tensor]:
            return node_smoothed_grad(model, x, y, sigma=sigma, num_pairs=num_pairs,
                                      seed=seed).grads
        return "node", node
    options: dict[str, Any] = {
        "sigma": sigma, "num_pairs": num_pairs, "rank": 1,
        "perturbation": "lowrank" if estimator == "lowrank" else "gaussian",
        "orthogonal": estimator == "orthogonal",
    }
    if choose_population(model, "cpu"):
        def population(seed: int) -> list[torch.Tensor]:
            return population_smoothed_grad(model, x, y, seed=seed, **options).grads
        return "population", population
    params = [p for p in model.parameters() if p.requires_grad]

    def loop(seed: int) -> list[torch.Tensor]:
        return estimate_smoothed_grad(lambda: F.cross_entropy(model(x), y), params, seed=seed,
                                      **options).grads
    return "loop", loop


def backprop_call(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """∇L(θ) of the batch by autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))


def score(estimate: Sequence[torch.Tensor], reference: torch.Tensor,
          layers: Sequence[Layer] = ()) -> tuple[float, float, list[float]]:
    """(‖ĝ − ∇L_σ‖²/‖∇L_σ‖², cos(ĝ, ∇L_σ), each layer's part of the first)."""
    g = flat(estimate)
    errors = (g - reference).square() / reference.square().sum()
    rel = float(errors.sum())
    cosine = float(g.dot(reference) / (g.norm() * reference.norm()).clamp_min(1e-300))
    return rel, cosine, [float(errors[layer.start:layer.stop].sum()) for layer in layers]


def measure(call: Callable[[int], list[torch.Tensor]], reference: torch.Tensor, repeats: int,
            layers: Sequence[Layer] = ()) -> tuple[list[float], list[float], float, list[float]]:
    """Relative MSEs and cosines of seeds 0..repeats−1, the median ms (after one warm-up), and
    each layer's part of the relative MSE, averaged over the seeds."""
    call(0)
    rels, cosines, times = [], [], []
    parts = [0.0] * len(layers)
    for seed in range(repeats):
        start = time.perf_counter()
        estimate = call(seed)
        times.append(time.perf_counter() - start)
        rel, cosine, per_layer = score(estimate, reference, layers)
        rels.append(rel)
        cosines.append(cosine)
        parts = [a + b / repeats for a, b in zip(parts, per_layer)]
    return rels, cosines, 1000 * statistics.median(times), parts


def standard_error(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


# ----- one panel --------------------------------------------------------------------------------
def run_panel(network: str, state: str, model: nn.Module, source: str, batch: Data,
              args: argparse.Namespace, pairs: dict[str, tuple[int, ...]]) -> Panel:
    x, y = batch
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
    # pairs per vmap call (MLP: measured 1.9 ms a draw with 8, 2.2 to 2.7 with 32 or 64); LeNet: a loop
    chunk = 8 if network == "mlp" else 1
    reference = reference_gradient(model, x, y, sigma=args.sigma, draws=args.reference_draws,
                                   chunk=chunk)
    print(f"{network} {state}: loss {loss:.4f}, reference of {reference.draws} draws in "
          f"{reference.seconds:.1f} s, its relative MSE {reference.rel_mse:.3g}", flush=True)
    panel = Panel(network, state, source, loss, reference, layers=layers_of(model))
    common = dict(network=network, state=state, sigma=args.sigma, batch=BATCH,
                  reference_draws=reference.draws, reference_rel_mse=reference.rel_mse,
                  threads=torch.get_num_threads())
    for estimator in ESTIMATORS:
        for n in pairs[estimator]:
            start = time.perf_counter()
            path, call = estimator_call(model, x, y, estimator, n, args.sigma)
            rels, cosines, ms, parts = measure(call, reference.grad, args.repeats, panel.layers)
            panel.layer_rel_mse[(estimator, n)] = parts
            rel = statistics.fmean(rels)
            panel.rows.append(Row(
                estimator=estimator, forward_only=True, path=path, num_pairs=n,
                repeats=args.repeats, rel_mse=rel, rel_mse_se=standard_error(rels),
                cosine=statistics.fmean(cosines), cost_forward=2 * n, ms=ms,
                rel_mse_x_forward=rel * 2 * n, rel_mse_x_ms=rel * ms, **common))
            print(f"  {estimator:10} N={n:<4} relMSE {rel:10.4g}  cos {panel.rows[-1].cosine:7.4f}"
                  f"  {ms:9.2f} ms  ({time.perf_counter() - start:.1f} s)", flush=True)
    rels, cosines, ms, _ = measure(lambda _: backprop_call(model, x, y), reference.grad,
                                   args.repeats)
    panel.rows.append(Row(
        estimator="backprop", forward_only=False, path="autograd", num_pairs=None, repeats=1,
        rel_mse=rels[0], rel_mse_se=None, cosine=cosines[0], cost_forward=None, ms=ms,
        rel_mse_x_forward=None, rel_mse_x_ms=rels[0] * ms, **common))
    print(f"  {'backprop':10} (not forward-only) relMSE {rels[0]:.4g}  {ms:.2f} ms", flush=True)
    smallest = min(r.rel_mse for r in panel.rows if r.forward_only)
    if reference.rel_mse >= REFERENCE_SHARE * smallest:
        panel.warning = (
            f"WARNING: {network} {state}: the reference's own relative MSE {reference.rel_mse:.3g} "
            f"is not under {REFERENCE_SHARE:.0%} of the smallest relative MSE in the table "
            f"({smallest:.3g}); raise --reference-draws (now {reference.draws})")
        print(panel.warning, flush=True)
    return panel


# ----- outputs ----------------------------------------------------------------------------------
def sig3(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def markdown(panels: Sequence[Panel], settings: dict[str, Any]) -> str:
    lines = ["# Estimators of ∇L_σ against reparameterized backprop", "",
             f"σ = {settings['sigma']} (absolute), batch of {BATCH} Fashion-MNIST training images, "
             f"{settings['repeats']} repeats (seeds 0..{settings['repeats'] - 1}), "
             f"{settings['threads']} torch threads. Relative MSE ‖ĝ − ∇L_σ‖²/‖∇L_σ‖² "
             "(± standard error); cost = 2N forward passes of the batch; sorted by "
             "relMSE × forward passes. `backprop` is ∇L(θ) itself, for scale: not forward-only.",
             ""]
    for panel in panels:
        ref = panel.reference
        lines += [f"## {TITLES[panel.network]}, {TITLES[panel.state]}", "",
                  f"Weights: {panel.source}. Loss on the batch {panel.loss:.4f}. Reference: "
                  f"{ref.draws} draws (antithetic pairs), its own relative MSE "
                  f"{sig3(ref.rel_mse)}.", ""]
        if panel.warning:
            lines += [f"**{panel.warning}**", ""]
        lines += ["| estimator | path | N | relMSE | ± s.e. | cosine | forward passes | ms "
                  "| relMSE × fwd | relMSE × ms |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        rows = sorted(panel.rows, key=lambda r: (not r.forward_only, r.rel_mse_x_forward or 0.0))
        for r in rows:
            name = r.estimator if r.forward_only else "backprop (not forward-only)"
            lines.append(
                f"| {name} | {r.path} | {'' if r.num_pairs is None else r.num_pairs} "
                f"| {sig3(r.rel_mse)} | {sig3(r.rel_mse_se)} | {sig3(r.cosine)} "
                f"| {'' if r.cost_forward is None else r.cost_forward} | {sig3(r.ms)} "
                f"| {sig3(r.rel_mse_x_forward)} | {sig3(r.rel_mse_x_ms)} |")
        lines += ["", *layer_table(panel)]
    return "\n".join(lines)


def layer_table(panel: Panel) -> list[str]:
    """Where each estimator's error sits, layer by layer, at N = LAYER_PAIRS."""
    shown = [e for e in ESTIMATORS if (e, LAYER_PAIRS) in panel.layer_rel_mse]
    if not shown:
        return []
    parts = {e: panel.layer_rel_mse[(e, LAYER_PAIRS)] for e in shown}
    ratio = "gaussian" in parts and "node" in parts
    lines = [f"Each layer's part of the relative MSE at N = {LAYER_PAIRS} "
             "(‖ĝ_layer − ∇_layer L_σ‖²/‖∇L_σ‖²; the parts add up to the relative MSE above):", "",
             "| layer | kind | entries | outputs | " + " | ".join(shown)
             + (" | gaussian / node |" if ratio else " |"),
             "|---|---|--:|--:|" + "--:|" * (len(shown) + ratio)]
    for i, layer in enumerate(panel.layers):
        cells = [sig3(parts[e][i]) for e in shown]
        if ratio:
            cells.append(sig3(parts["gaussian"][i] / max(parts["node"][i], 1e-300)))
        lines.append(f"| {layer.name} | {layer.kind} | {layer.entries} | {layer.outputs} | "
                     + " | ".join(cells) + " |")
    return [*lines, ""]


def csv_text(panels: Sequence[Panel]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for panel in panels:
        for row in panel.rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    return out.getvalue()


def json_text(panels: Sequence[Panel], settings: dict[str, Any]) -> str:
    return json.dumps({
        "settings": settings,
        "panels": [{
            "network": p.network, "state": p.state, "source": p.source, "loss": p.loss,
            "reference": {"draws": p.reference.draws, "rel_mse": p.reference.rel_mse,
                          "norm": float(p.reference.grad.norm()),
                          "seconds": p.reference.seconds},
            "warning": p.warning,
            "layers": [asdict(layer) for layer in p.layers],
            "layer_rel_mse": {f"{e}/{n}": v for (e, n), v in p.layer_rel_mse.items()},
        } for p in panels],
        "rows": [asdict(r) for p in panels for r in p.rows],
    }, indent=2)


def figure(panels: Sequence[Panel], path: Path) -> None:
    """Relative MSE against forward passes, log–log, one panel per network and state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(p.network for p in panels))
    states = list(dict.fromkeys(p.state for p in panels))
    fig, axes = plt.subplots(len(networks), len(states), squeeze=False,
                             figsize=(5.2 * len(states), 4.0 * len(networks)))
    handles: dict[str, Any] = {}
    for panel in panels:
        ax = axes[networks.index(panel.network)][states.index(panel.state)]
        for estimator in ESTIMATORS:
            rows = [r for r in panel.rows if r.estimator == estimator]
            if not rows:
                continue
            colour, marker = STYLE[estimator]
            bars = ax.errorbar([r.cost_forward for r in rows], [r.rel_mse for r in rows],
                               yerr=[r.rel_mse_se or 0.0 for r in rows], color=colour,
                               marker=marker, capsize=3, label=estimator)
            handles.setdefault(estimator, bars)
        for r in panel.rows:
            if not r.forward_only:
                handles.setdefault("backprop", ax.axhline(
                    r.rel_mse, color="black", linestyle="--",
                    label="backprop ∇L(θ) (not forward-only)"))
        handles.setdefault("reference", ax.axhline(
            panel.reference.rel_mse, color="grey", linestyle=":",
            label="reference's own relative MSE"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{TITLES[panel.network]}, {TITLES[panel.state]}")
        ax.set_xlabel("cost: forward passes of the batch (2N)")
        if states.index(panel.state) == 0:
            ax.set_ylabel("relative MSE ‖ĝ − ∇L_σ‖² / ‖∇L_σ‖²")
        ax.grid(True, which="major", alpha=0.3)
    for row in axes:
        for ax in row:
            if not ax.has_data():
                ax.set_visible(False)
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()],
               loc="lower center", ncol=min(len(handles), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.13 if len(networks) == 1 else 0.08, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


# ----- command line -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--networks", help="comma-separated, of mlp,lenet (default both; "
                        "--quick: mlp)")
    parser.add_argument("--states", default="init,trained", help="comma-separated, of init,trained")
    parser.add_argument("--repeats", type=int, help="R: seeds 0..R-1 per estimator and N "
                        "(default 8; --quick: 2)")
    parser.add_argument("--reference-draws", type=int, help="M, gradients in the reference "
                        "(default 4096; --quick: 256)")
    parser.add_argument("--sigma", type=float, default=0.01, help="absolute σ (default 0.01)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="epochs of backprop for the trained state (default 2)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="take network NAME's trained state from this robusttrain checkpoint")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_variance"),
                        help="folder of the cached trained states (default runs/bench_variance)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: MLP only, N lists shortened, M = 256, R = 2")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_variance"),
                        help="output folder (default runs/bench_variance)")
    args = parser.parse_args(argv)
    args.networks = (args.networks or ("mlp" if args.quick else ",".join(NETWORKS))).split(",")
    args.states = args.states.split(",")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 8
    if args.reference_draws is None:
        args.reference_draws = 256 if args.quick else 4096
    for name, values, allowed in (("--networks", args.networks, NETWORKS),
                                  ("--states", args.states, STATES)):
        if not values or any(v not in allowed for v in values):
            parser.error(f"{name} takes a comma-separated list of {', '.join(allowed)}")
    if args.repeats < 1 or args.reference_draws < 4 or args.sigma <= 0:
        parser.error("--repeats must be at least 1, --reference-draws at least 4, --sigma > 0")
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in NETWORKS:
            parser.error(f"--checkpoint takes NAME=PATH with NAME one of {', '.join(NETWORKS)}, "
                         f"got {item!r}")
        checkpoints[name] = path
    args.checkpoint = checkpoints
    return args


def main(argv: Sequence[str] | None = None, data: Data | None = None) -> list[Panel]:
    """Run the benchmark and write its outputs.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
        data: normalized training images (n, 1, 28, 28) and labels instead of Fashion-MNIST's
            (tests); n ≥ 256.

    Returns:
        The panels, one per network and state, in the order run.
    """
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    started = time.perf_counter()
    if data is None:
        data = load_fashion()
    batch = fixed_batch(data)
    settings = {"sigma": args.sigma, "batch": BATCH, "repeats": args.repeats,
                "reference_draws": args.reference_draws, "threads": torch.get_num_threads(),
                "train_epochs": args.train_epochs, "quick": args.quick,
                "pairs": {k: list(v) for k, v in pairs.items()}, "torch": torch.__version__,
                "command": " ".join(["experiments/bench_variance.py", *(argv or sys.argv[1:])])}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"σ = {args.sigma}, R = {args.repeats}, M = {args.reference_draws}", flush=True)
    panels = []
    for network in args.networks:
        for state in args.states:
            if state == "init":
                model, source = build(network).eval(), "torch.manual_seed(0), then the constructor"
            else:
                model, source = trained_state(network, data, args.train_epochs, args.cache,
                                              args.checkpoint)
            panels.append(run_panel(network, state, model, source, batch, args, pairs))
    args.out.mkdir(parents=True, exist_ok=True)
    settings["seconds"] = time.perf_counter() - started
    write_atomic(args.out / "results.csv", csv_text(panels))
    table = markdown(panels, settings)
    write_atomic(args.out / "results.md", table + "\n")
    write_atomic(args.out / "results.json", json_text(panels, settings) + "\n")
    figure(panels, args.out / "variance.png")
    print()
    print(table)
    for panel in panels:
        if panel.warning:
            print(panel.warning)
    print(f"wrote {args.out}/results.csv, results.md, results.json, variance.png in "
          f"{settings['seconds']:.0f} s")
    return panels


if __name__ == "__main__":
    main()

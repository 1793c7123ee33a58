"""What fresh read noise adds to the in-the-loop estimate, predicted and measured.

    python experiments/chip_variance.py --ckpt <model.ckpt> [--estimates 200]

On one chip of the "+F+N" target (2-bit per-channel weights, 1% stuck-at, relative read noise 0.05)
and one fixed batch of 256 Fashion-MNIST training images, the settings of
configs/fashion_mlp_chip.yaml (σ = 0.1·max|W| per tensor, 32 low-rank pairs):

* s² — the variance of one member's loss over the chip's read noise (50 inferences at θ);
* the estimate's total variance tr Cov(ĝ) over ``--estimates`` estimates (seeds 0, 1, ...):
  in the loop (each member its own read noise, :func:`chip_smoothed_grad`), with
  ``reads_per_member`` 4, and with common random numbers (both members of a pair on the same read
  noise — what a simulation can do and a chip cannot);
* the prediction of docs/theory.md §19 for the extra variance: s²/(2N)·Σ_t n_t/σ_t².

Prints a table (markdown); run nothing else meanwhile if the milliseconds matter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from robusttrain.data import ImageDataModule  # noqa: E402
from robusttrain.evaluation.robustness import draw_seed  # noqa: E402
from robusttrain.noise import ChipPort, SimulatedChip, deployed, smoothing_sigmas  # noqa: E402
from robusttrain.training import load_checkpoint  # noqa: E402
from robusttrain.training.chip_in_the_loop import chip_smoothed_grad  # noqa: E402
from robusttrain.zo.estimators import estimate_smoothed_grad  # noqa: E402

TARGET = [{"kind": "quantize", "bits": 2, "per_channel": True, "clip": 2.5},
          {"kind": "stuck_at", "p": 0.01},
          {"kind": "read_noise", "noise": "relative", "level": 0.05}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--estimates", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--level", type=float, default=0.1, help="smoothing level (relative)")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.ckpt).backbone
    data = ImageDataModule(dataset="fashion_mnist", batch_size=256)
    data.setup("fit")
    x, y = data.train_x[:256], data.train_y[:256]
    chip_seed = draw_seed(0, 0)
    params = list(model.parameters())
    sigma = smoothing_sigmas(model, params, noise="relative", level=args.level, sigma=0.01)
    options = dict(sigma=sigma, num_pairs=args.pairs, perturbation="lowrank", rank=1)

    port = ChipPort(SimulatedChip(TARGET, seed=chip_seed))
    port.program(model)
    reads = torch.stack([F.cross_entropy(port.run(x), y) for _ in range(50)])
    s2 = float(reads.var())
    sizes = [p.numel() for p in params]
    scales = [float(s) if not torch.is_tensor(s) else float(s.mean()) for s in sigma]
    predicted = s2 / (2 * args.pairs) * sum(n / sc ** 2 for n, sc in zip(sizes, scales))

    def crn_estimate(seed: int) -> list[torch.Tensor]:
        def pair_loss(i: int) -> torch.Tensor:
            with deployed(model, TARGET, device_seed=chip_seed,
                          inference_seed=draw_seed(seed, 1000 + i)):
                return F.cross_entropy(model(x), y)
        return estimate_smoothed_grad(pair_loss, params, seed=seed, pair_loss=True,
                                      **options).grads

    rows = []
    for name, make in (
        ("in the loop, 1 read per member",
         lambda s: chip_smoothed_grad(port, model, x, y, seed=s, **options).grads),
        ("in the loop, 4 reads per member",
         lambda s: chip_smoothed_grad(port, model, x, y, seed=s, reads_per_member=4,
                                      **options).grads),
        ("common random numbers (simulation only)", crn_estimate),
    ):
        start = time.perf_counter()
        flat = torch.stack([torch.cat([g.flatten() for g in make(s)])
                            for s in range(args.estimates)])
        ms = 1e3 * (time.perf_counter() - start) / args.estimates
        # the standard error of the trace: the spread of the traces of 5 disjoint groups / √5
        groups = torch.stack([g.var(0).sum() for g in flat.chunk(5)])
        rows.append((name, float(flat.var(0).sum()), float(groups.std() / 5 ** 0.5),
                     float(flat.mean(0).norm() ** 2), ms))
    print(f"member-loss read-noise variance s² = {s2:.3g} (std {s2 ** 0.5:.3g}) at batch 256; "
          f"predicted extra variance s²/(2N)·Σ n_t/σ_t² = {predicted:.4g}")
    print("| estimate | tr Cov(ĝ) ± its standard error | ‖mean ĝ‖² | ms per estimate |")
    print("|---|---|---|---|")
    for name, var, se, norm2, ms in rows:
        print(f"| {name} | {var:.4g} ± {se:.2g} | {norm2:.3g} | {ms:.0f} |")
    print(f"measured extra (1 read − CRN): {rows[0][1] - rows[2][1]:.4g} ± "
          f"{(rows[0][2] ** 2 + rows[2][2] ** 2) ** 0.5:.2g}; (1 read − 4 reads) / (3/4): "
          f"{(rows[0][1] - rows[1][1]) / 0.75:.4g} ± "
          f"{(rows[0][2] ** 2 + rows[1][2] ** 2) ** 0.5 / 0.75:.2g}")


if __name__ == "__main__":
    main()

"""Short training loops that chose the node-perturbation recipe (the numbers in docs/results).

    python experiments/node_trials.py --pairs 64 --batch 128 --opt sgd --lr 0.02 --epochs 12 --cos

A plain loop over the Fashion-MNIST training set (all 60,000 images, no validation split, test
accuracy of the current weights after each ``--eval-every`` epochs), with
:func:`robusttrain.zo.node.node_smoothed_grad` (or ``--backprop``) feeding a torch optimizer; no
Lightning, so its times are lower than those of ``robusttrain fit``. It is for exploring settings;
the committed recipe is measured through ``robusttrain fit`` (experiments/single_runs.py).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from robusttrain.data.sources import DATASETS, load_arrays
from robusttrain.models import MLP, LeNet
from robusttrain.zo.node import node_smoothed_grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", choices=["mlp", "lenet"], default="mlp")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pairs", type=int, default=1, help="antithetic pairs per example")
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--opt", choices=["adam", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cos", action="store_true", help="cosine learning rate over all steps")
    p.add_argument("--ema", type=float, default=0.0, help="also test an EMA of the weights")
    p.add_argument("--backprop", action="store_true")
    p.add_argument("--eval-every", type=int, default=1)
    args = p.parse_args()

    torch.manual_seed(0)
    arrays, spec = load_arrays(args.dataset, None), DATASETS[args.dataset]

    def prepare(x: object) -> torch.Tensor:
        t = torch.tensor(x).float().div_(255)
        return (t - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(
            1, -1, 1, 1)

    x_train, y_train = prepare(arrays["train_x"]), torch.tensor(arrays["train_y"]).long()
    x_test, y_test = prepare(arrays["test_x"]), torch.tensor(arrays["test_y"]).long()
    model: nn.Module = (MLP(x_train[0].numel(), [128], 10) if args.model == "mlp"
                        else LeNet(in_channels=x_train.shape[1], image_size=x_train.shape[-1]))
    steps = len(x_train) // args.batch
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=args.lr) if args.opt == "adam"
        else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps) if args.cos else None
    ema = copy.deepcopy(model) if args.ema else None

    def test(net: nn.Module) -> float:
        with torch.no_grad():
            return sum(int((net(x_test[i:i + 2000]).argmax(1) == y_test[i:i + 2000]).sum())
                       for i in range(0, len(x_test), 2000)) / len(x_test)

    start, step = time.time(), 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        for k in range(steps):
            rows = order[k * args.batch:(k + 1) * args.batch]
            x, y = x_train[rows], y_train[rows]
            if args.backprop:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
            else:
                est = node_smoothed_grad(model, x, y, sigma=args.sigma, num_pairs=args.pairs,
                                         seed=step)
                for param, grad in zip(model.parameters(), est.grads):
                    param.grad = grad
            opt.step()
            step += 1
            if sched is not None:
                sched.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - args.ema)
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            extra = f" ema {test(ema):.4f}" if ema is not None else ""
            print(f"epoch {epoch + 1} test {test(model):.4f}{extra} time {time.time() - start:.1f}s",
                  flush=True)


if __name__ == "__main__":
    main()

"""``robusttrain meta-train``: learn a zeroth-order attack optimizer (ZO-L2L) on training images.

``robusttrain meta-train --ckpt model.ckpt --threat linf --eps 0.1 --out zo_l2l.pt`` attacks
training images of the checkpoint's model (the first ``--images`` the model classifies right) and
meta-trains :class:`~robusttrain.evaluation.zo_l2l.LearnedZOOptimizer` in the paper's two stages
(``--stages update,query``: the UpdateRNN, then the QueryRNN with the UpdateRNN frozen;
``--init`` continues a saved optimizer, e.g. with ``--stages query``). It writes the optimizer to
``--out`` and its meta-training history to the same path with ``.json``; ``robusttrain attack
--learned NAME=PATH`` runs it on test images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robusttrain.commands.attack import add_query_options
from robusttrain.commands.errors import OneLineParser, UsageError, run_in_one_line
from robusttrain.commands.robustness import checkpoints_and_data
from robusttrain.evaluation.attack import THREATS, PixelModel
from robusttrain.evaluation.zo_l2l import (
    STAGES,
    LearnedZOOptimizer,
    load_learned,
    meta_train,
    save_learned,
)
from robusttrain.files import write_atomic

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = "Meta-train a learned zeroth-order attack optimizer (ZO-L2L) on training images."


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="robusttrain meta-train", description=DESCRIPTION)
    p.add_argument("--ckpt", required=True, help="the model whose training images are attacked")
    p.add_argument("--threat", default="linf", help=f"{' or '.join(THREATS)} (default linf)")
    p.add_argument("--eps", type=float, default=0.1, help="budget in pixel units of [0, 1]")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="stages to run, in order (default update,query)")
    p.add_argument("--init", help="a saved optimizer to continue (default: a new one)")
    p.add_argument("--hidden-size", type=int, help="LSTM units of a new optimizer (default 10)")
    p.add_argument("--images", type=int, default=1000,
                   help="the first N training images; those misclassified are dropped")
    p.add_argument("--episodes", type=int, default=60, help="episodes per stage (default 60)")
    p.add_argument("--validation-images", type=int, default=100,
                   help="of those images, the last N choose the kept parameters of each stage "
                        "(default 100; 0: keep the last)")
    p.add_argument("--validate-every", type=int, default=5, help="episodes between validations")
    p.add_argument("--iterations", type=int, default=200, help="attack steps per episode")
    p.add_argument("--unroll", type=int, default=20, help="steps per truncated unroll")
    p.add_argument("--batch-size", type=int, default=32, help="images per episode")
    p.add_argument("--lr", type=float, default=0.005, help="Adam's step size for the RNNs")
    add_query_options(p)
    p.add_argument("--out", required=True, help="file to write the optimizer to (e.g. zo_l2l.pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on bad input (after one line on stderr)."""
    return run_in_one_line("robusttrain meta-train", _parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    if args.threat not in THREATS:
        raise UsageError(f"--threat must be one of {', '.join(THREATS)}, got {args.threat!r}")
    stages = [s for s in args.stages.split(",") if s]
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise UsageError(f"--stages must list some of {', '.join(STAGES)} once each, "
                         f"got {args.stages!r}")
    if not args.eps > 0:
        raise UsageError(f"--eps must be positive, got {args.eps}")
    if args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    if args.init and args.hidden_size is not None:
        raise UsageError("--hidden-size applies to a new optimizer; --init continues one whose "
                         "size is fixed: drop one of them")
    learned, history = (load_learned(args.init) if args.init
                        else (LearnedZOOptimizer(hidden_size=args.hidden_size or 10), []))
    loaded, dm = checkpoints_and_data([args.ckpt], args.data_dir)
    dm.setup("fit")
    mean = torch.tensor(dm.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.spec.std).view(1, -1, 1, 1)
    model = PixelModel(loaded[0].backbone, dm.spec.mean, dm.spec.std).eval()
    x = dm.train_x[: args.images] * std + mean  # back to pixels in [0, 1]
    y = y_all = dm.train_y[: args.images]
    with torch.no_grad():
        right = model(x).argmax(dim=1) == y
    x, y = x[right], y[right]
    if args.validation_images < 0:
        raise UsageError(f"--validation-images must be >= 0, got {args.validation_images}")
    if len(x) < args.batch_size + args.validation_images:
        raise UsageError(f"only {len(x)} of the first {len(y_all)} training images are classified "
                         f"right, fewer than --batch-size {args.batch_size} + "
                         f"--validation-images {args.validation_images}; raise --images")
    validation = None
    if args.validation_images:
        validation = (x[-args.validation_images:], y[-args.validation_images:])
        x, y = x[:-args.validation_images], y[:-args.validation_images]
    print(f"meta-training on {len(x)} training images of {args.ckpt} ({dm.spec.name}; "
          f"{args.validation_images} more to validate), "
          f"{args.threat} ε = {args.eps:g}, stages {' then '.join(stages)}")
    for stage in stages:
        history += meta_train(learned, model, x, y, stage=stage, eps=args.eps, threat=args.threat,
                              num_pairs=args.num_pairs, sigma=args.sigma,
                              iterations=args.iterations, unroll=args.unroll,
                              episodes=args.episodes, batch_size=args.batch_size, lr=args.lr,
                              kappa=args.kappa, seed=args.seed, validation=validation,
                              validate_every=args.validate_every)
    learned.settings.update(checkpoint=args.ckpt, dataset=dm.spec.name, images=len(x))
    out = Path(args.out)
    save_learned(learned, out, history)
    record = {"settings": learned.settings, "trained_stages": learned.trained_stages,
              "hidden_size": learned.hidden_size, "history": history}
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0

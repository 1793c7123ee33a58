"""``robusttrain attack``: black-box adversarial examples against checkpoints, from outputs only.

``robusttrain attack --ckpt A.ckpt [--ckpt B.ckpt ...] --threat linf --eps 0.2 --images 100
--max-queries 10000 --out DIR`` attacks the first ``--images`` test images of each checkpoint with
every optimizer of ``--optimizers`` (:mod:`robusttrain.evaluation.attack`; ``pgd`` is the
white-box reference) and of each learned optimizer given as ``--learned NAME=PATH`` (written by
``robusttrain meta-train``), and writes ``attack.csv`` (one row per model, optimizer and image),
``attack.json`` (settings and per model and optimizer: success rate over all images and over the
images the model classified right, queries, distortion, success against query budgets) and
``attack.png`` (success rate against queries, one panel per model) and ``attack_loss.png`` (mean
attack loss over all images against queries, one panel per model).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from robusttrain.commands.errors import OneLineParser, UsageError, run_in_one_line
from robusttrain.commands.robustness import checkpoints_and_data
from robusttrain.evaluation.attack import (
    LEARNED,
    OPTIMIZERS,
    THREATS,
    PixelModel,
    run_attack,
    success_curve,
    summarize_attack,
)
from robusttrain.evaluation.report import save_figure
from robusttrain.evaluation.zo_l2l import load_learned
from robusttrain.files import write_atomic

__all__ = ["DESCRIPTION", "add_query_options", "main"]

DESCRIPTION = "Black-box adversarial attacks on checkpoints (zeroth-order optimizers, PGD reference)."

# step sizes for the margin loss on pixels in [0, 1], chosen on the MNIST MLP at ε = 0.2 (L∞)
# and ε = 2 (L2); zo_sgd's steps are not normalized, so its size depends on the logits' scale
DEFAULT_LR = {"linf": {"zo_sgd": 0.003, "zo_signsgd": 0.01, "zo_adam": 0.01, "nes": 0.01,
                       "pgd": 0.01},
              "l2": {"zo_sgd": 0.001, "zo_signsgd": 0.002, "zo_adam": 0.01, "nes": 0.1, "pgd": 0.1}}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="robusttrain attack", description=DESCRIPTION)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeatable)")
    p.add_argument("--name", action="append", help="a label per --ckpt")
    p.add_argument("--threat", default="linf", help=f"{' or '.join(THREATS)} (default linf)")
    p.add_argument("--eps", type=float, default=0.2, help="budget in pixel units of [0, 1]")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default all)")
    p.add_argument("--lr", default="", help="step sizes, e.g. zo_sgd=2,zo_adam=0.01 (defaults per "
                                            "optimizer and threat)")
    p.add_argument("--learned", action="append", default=[], metavar="NAME=PATH",
                   help="a learned optimizer (robusttrain meta-train) to run as NAME (repeatable)")
    p.add_argument("--targeted", action="store_true",
                   help="targeted: each image gets a random other class (seeded)")
    p.add_argument("--images", type=int, default=100, help="the first N images (default 100)")
    p.add_argument("--split", default="test", choices=("test", "train"),
                   help="attack test images (default) or training images (to tune step sizes)")
    p.add_argument("--max-queries", type=int, default=10_000, help="per image (default 10000)")
    add_query_options(p)
    p.add_argument("--out", required=True, help="output folder")
    return p


def add_query_options(p: argparse.ArgumentParser) -> None:
    """The options of the queries, shared with ``robusttrain meta-train``: the estimate's pairs
    and σ, the loss's κ, the seed, and where the data are."""
    p.add_argument("--num-pairs", type=int, default=10, help="antithetic pairs per step")
    p.add_argument("--sigma", type=float, default=0.001, help="smoothing σ in pixel units")
    p.add_argument("--kappa", type=float, default=0.0, help="margin confidence κ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="where the dataset files are (default: the checkpoint's)")


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on bad input (after one line on stderr)."""
    return run_in_one_line("robusttrain attack", _parser(), _run, argv)


def _learning_rates(text: str, threat: str) -> dict[str, float]:
    rates = dict(DEFAULT_LR[threat])
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in OPTIMIZERS:
            raise UsageError(f"--lr names {name!r}; optimizers are {', '.join(OPTIMIZERS)}")
        try:
            rates[name] = float(value)
        except ValueError:
            raise UsageError(f"--lr {item!r}: expected optimizer=number") from None
    return rates


def _run(args: argparse.Namespace) -> int:
    if args.threat not in THREATS:
        raise UsageError(f"--threat must be one of {', '.join(THREATS)}, got {args.threat!r}")
    optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or not optimizers:
        raise UsageError(f"--optimizers: unknown {unknown}; choose from {', '.join(OPTIMIZERS)}")
    rates = _learning_rates(args.lr, args.threat)
    learned, files = {}, {}
    for item in args.learned:
        name, _, path = item.partition("=")
        if not name or not path:
            raise UsageError(f"--learned {item!r}: expected NAME=PATH")
        if name in OPTIMIZERS or name in learned:
            raise UsageError(f"--learned name {name!r} is taken; choose another")
        learned[name], files[name] = load_learned(path)[0], path
        if learned[name].settings.get("threat") not in (None, args.threat):
            raise UsageError(f"--learned {path} was meta-trained for the "
                             f"{learned[name].settings['threat']} threat; this attack is "
                             f"--threat {args.threat}")
    optimizers += list(learned)
    if args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    if args.name and len(args.name) != len(args.ckpt):
        raise UsageError(f"{len(args.name)} --name for {len(args.ckpt)} --ckpt; give one each")
    names = args.name or [Path(p).parent.parent.name or Path(p).stem for p in args.ckpt]
    if len(set(names)) != len(names):
        raise UsageError(f"two checkpoints have the same name {names}; label them with --name")
    loaded, dm = checkpoints_and_data(args.ckpt, args.data_dir)
    dm.setup("test" if args.split == "test" else "fit")
    mean = torch.tensor(dm.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.spec.std).view(1, -1, 1, 1)
    images = dm.test_x if args.split == "test" else dm.train_x
    labels = dm.test_y if args.split == "test" else dm.train_y
    x = images[: args.images] * std + mean  # back to pixels in [0, 1]
    y = labels[: args.images]
    targets = None
    if args.targeted:
        g = torch.Generator().manual_seed(args.seed)
        shift = torch.randint(1, len(dm.spec.class_names), y.shape, generator=g)
        targets = (y + shift) % len(dm.spec.class_names)
    rows, traces = [], {}
    summary: dict[str, dict[str, Any]] = {}  # model -> optimizer -> its summary
    budgets = [100, 300, 1000, 3000, 10_000, args.max_queries]
    budgets = sorted({b for b in budgets if b <= args.max_queries})
    for name, ckpt in zip(names, loaded):
        model = PixelModel(ckpt.backbone, dm.spec.mean, dm.spec.std)
        summary[name] = {}
        for optimizer in optimizers:
            rule = learned.get(optimizer)
            result = run_attack(model, x, y, eps=args.eps, threat=args.threat,
                                optimizer=LEARNED if rule else optimizer, targets=targets,
                                max_queries=args.max_queries, num_pairs=args.num_pairs,
                                sigma=args.sigma, lr=rates.get(optimizer, 1.0), kappa=args.kappa,
                                seed=args.seed, learned=rule)
            summary[name][optimizer] = {
                **summarize_attack(result), "budgets": budgets,
                "success_at_budget": success_curve(result, budgets),
                **({"learned": rule.describe(), "file": files[optimizer]} if rule
                   else {"lr": rates[optimizer]})}
            per_step = 1 if optimizer == "pgd" else 2 * args.num_pairs + 1
            traces[name, optimizer] = (per_step, result.loss_trace.mean(dim=1))
            for i in range(len(y)):
                rows.append({"model": name, "optimizer": optimizer, "image": i, "label": int(y[i]),
                             "target": "" if targets is None else int(targets[i]),
                             "success": int(result.success[i]), "queries": int(result.queries[i]),
                             "distortion": float(result.distortion[i]),
                             "loss_step200": float(result.loss_trace[
                                 min(200, len(result.loss_trace) - 1), i])})
            s = summary[name][optimizer]
            on_correct = s["success_rate_on_correct"]
            print(f"{name:<20} {optimizer:<11} broken {100 * s['success_rate']:6.2f}% of all, "
                  f"{'—' if on_correct is None else f'{100 * on_correct:6.2f}%'} of the "
                  f"{s['correct']} it classified right; median queries {s['median_queries']}, "
                  f"mean distortion {s['mean_distortion'] or 0:.4f}, mean loss after "
                  f"{min(200, len(result.loss_trace) - 1)} steps "
                  f"{s['mean_loss_at_step']['200']:.4f}")
    out = Path(args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "attack.csv", buf.getvalue().encode())
    settings = {k: v for k, v in vars(args).items()
                if k not in ("ckpt", "name", "out", "learned")}
    settings["learned"] = files
    settings.update(checkpoints=dict(zip(names, args.ckpt)), dataset=dm.spec.name,
                    queries_counted="every image sent to the model; pgd: forward-backward passes")
    write_atomic(out / "attack.json", (json.dumps({"settings": settings, "models": summary},
                                                  indent=2, allow_nan=False) + "\n").encode())
    _plot(summary, rows, names, optimizers, args, out / "attack.png")
    _plot_loss(traces, names, optimizers, args, out / "attack_loss.png")
    print(f"wrote {out / 'attack.csv'}, {out / 'attack.json'}, {out / 'attack.png'}, "
          f"{out / 'attack_loss.png'}")
    return 0


def _plot(
    summary: dict[str, dict[str, Any]], rows: list[dict[str, Any]], names: list[str],
    optimizers: list[str], args: argparse.Namespace, path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 2.2, 3.8), squeeze=False)
    grid = np.unique(np.geomspace(1, args.max_queries, 200).astype(int))
    for ax, name in zip(axes[0], names):
        for i, optimizer in enumerate(optimizers):
            mine = [r for r in rows if r["model"] == name and r["optimizer"] == optimizer]
            q = np.array([r["queries"] if r["success"] else np.inf for r in mine])
            ax.plot(grid, [100 * np.mean(q <= g) for g in grid], color=plt.cm.tab10(i),
                    **_style(optimizer, optimizers, args))
        ax.set_xscale("log")
        ax.set_ylim(0, 101)
        ax.set_xlabel("queries per image")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("images broken (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(_title(args), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _style(optimizer: str, optimizers: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Line label and style of one optimizer, the same in both figures."""
    if optimizer == "pgd":
        return {"label": optimizer, "linestyle": "--", "linewidth": 1.5}
    if optimizer == "zo_signsgd" and args.threat == "linf" and "nes" in optimizers:
        # drawn wide: nes takes the same steps in L∞ and lies on top of it
        return {"label": optimizer, "linewidth": 4.0, "alpha": 0.6}
    if optimizer == "nes" and args.threat == "linf" and "zo_signsgd" in optimizers:
        return {"label": "nes (= zo_signsgd in L∞)", "linewidth": 1.5}
    return {"label": optimizer, "linewidth": 1.5}


def _title(args: argparse.Namespace) -> str:
    kind = "targeted" if args.targeted else "untargeted"
    return (f"{kind} {args.threat} attack, ε = {args.eps:g}, first {args.images} {args.split} "
            "images (pgd: white box, forward-backward passes)")


def _plot_loss(
    traces: dict[tuple[str, str], tuple[int, torch.Tensor]], names: list[str],
    optimizers: list[str], args: argparse.Namespace, path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 2.2, 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, optimizer in enumerate(optimizers):
            per_step, mean_loss = traces[name, optimizer]
            queries = 1 + per_step * torch.arange(len(mean_loss))
            ax.plot(queries.numpy(), mean_loss.numpy(), color=plt.cm.tab10(i),
                    **_style(optimizer, optimizers, args))
        ax.set_xscale("log")
        ax.set_xlim(1, args.max_queries)
        ax.set_ylim(bottom=-args.kappa)
        ax.set_xlabel("queries per image")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean margin loss (κ = {args.kappa:g})")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(_title(args), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)

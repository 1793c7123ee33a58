"""``robusttrain compare``: train several methods and compare them under weight noise, or
through a deployment.

``robusttrain compare --config experiments/fashion_mlp.yaml`` (the file's format:
:mod:`robusttrain.comparison.config`; a file with a ``deployments:`` block is a deployment
comparison, :mod:`robusttrain.comparison.deployment`) writes its results to
``experiments/results/<name>/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from robusttrain.commands.errors import USAGE_ERROR, OneLineParser, UsageError, one_line_error
from robusttrain.comparison.config import CompareConfigError, load_config
from robusttrain.comparison.deployment import (
    DeploymentCompareConfig,
    is_deployment_config,
    load_deployment_config,
    run_deployment_comparison,
)
from robusttrain.comparison.runner import run_comparison

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = ("Train several methods and compare their accuracy under weight noise or through "
               "a deployment.")


def main(argv: list[str] | None = None) -> int:
    """``robusttrain compare --config FILE [--out DIR] [--device cpu|cuda]``.

    Returns:
        0 on success, 2 on a bad comparison config or other anticipated bad input (a dataset
        file, a method's arguments; see :mod:`robusttrain.commands.errors`), after printing one
        line to stderr.
    """
    parser = OneLineParser(prog="robusttrain compare", description=DESCRIPTION)
    parser.add_argument("--config", required=True, help="comparison YAML file")
    parser.add_argument("--out", help="output folder (default experiments/results/<name>)")
    parser.add_argument("--device", default="cpu", help="device for the robustness evaluation")
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"robusttrain compare: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    deployment = is_deployment_config(args.config)
    try:
        cfg = load_deployment_config(args.config) if deployment else load_config(args.config)
    except CompareConfigError as err:
        print(f"robusttrain compare: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    out = Path(args.out) if args.out else Path("experiments/results") / cfg.name
    command = f"robusttrain compare --config {args.config}" + (f" --out {args.out}" if args.out else "")
    try:
        if isinstance(cfg, DeploymentCompareConfig):
            report = run_deployment_comparison(cfg, out, device=args.device, command=command)
        else:
            report = run_comparison(cfg, out, device=args.device, command=command)
    except (ValueError, ArithmeticError) as err:  # DatasetError, NonFiniteLossError, ...
        message = one_line_error(err)
        if message is None:
            raise
        print(f"robusttrain compare: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    print(report.read_text())
    print(_where(out, deployment))
    return 0


def _where(out: Path, deployment: bool = False) -> str:
    """The closing lines: where the results are and how to read the table."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and "runs" not in p.relative_to(out).parts)
    where = f"Results in {out}/: {', '.join(files)} (trained runs in {out}/runs/).\n"
    if deployment:
        return where + (
            "Reading the table: each column is one target deployment; a cell is the test accuracy "
            "of that method's model run through it (mean over chips and read-noise draws, then "
            "over seeds); compare down a column, and with the float accuracies below."
        )
    return (
        where +
        "Reading the table: each row is one method (and training level); the η columns are test "
        "accuracy under that much weight noise, so the flatter the row, the more robust the model; "
        "compare rows of similar clean accuracy (the 'At matched clean accuracy' table)."
    )

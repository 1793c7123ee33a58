"""``robusttrain compare``: train several methods and compare them under weight noise.

``robusttrain compare --config experiments/fashion_mlp.yaml`` (the file's format:
:mod:`robusttrain.comparison.config`) writes its results to ``experiments/results/<name>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robusttrain.comparison.config import CompareConfigError, load_config
from robusttrain.comparison.runner import run_comparison

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``robusttrain compare --config FILE [--out DIR] [--device cpu|cuda]``."""
    parser = argparse.ArgumentParser(
        prog="robusttrain compare",
        description="Train several methods and compare their accuracy under weight noise.",
    )
    parser.add_argument("--config", required=True, help="comparison YAML file")
    parser.add_argument("--out", help="output folder (default experiments/results/<name>)")
    parser.add_argument("--device", default="cpu", help="device for the robustness evaluation")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except CompareConfigError as err:
        print(f"robusttrain compare: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("experiments/results") / cfg.name
    command = f"robusttrain compare --config {args.config}" + (f" --out {args.out}" if args.out else "")
    report = run_comparison(cfg, out, device=args.device, command=command)
    print(report.read_text())
    return 0

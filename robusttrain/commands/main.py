"""The ``robusttrain`` command.

* ``robusttrain fit|validate|test|predict --config configs/x.yaml [--model.init_args.sigma 0.05 ...]``
  — LightningCLI over :class:`robusttrain.training.Classifier` (and its subclasses) and
  :class:`robusttrain.data.ImageDataModule` (:mod:`robusttrain.training.lightning_cli`). Each run
  writes ``runs/<name>/version_<k>/`` holding ``config.yaml`` (the resolved config),
  ``metrics.csv`` and ``checkpoints/{best,last}.ckpt``.
* ``robusttrain robustness ...`` — accuracy under weight noise (:mod:`robusttrain.commands.robustness`).
* ``robusttrain compare ...`` — train several methods and compare them under weight noise
  (:mod:`robusttrain.commands.compare`).
"""

from __future__ import annotations

import sys

from robusttrain.commands import compare, robustness
from robusttrain.training.lightning_cli import make_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``robusttrain`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "robustness":
        return robustness.main(argv[1:])
    if argv and argv[0] == "compare":
        return compare.main(argv[1:])
    make_cli(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``robusttrain`` command.

* ``robusttrain fit|validate|test|predict --config configs/x.yaml [--model.init_args.sigma 0.05 ...]``
  — LightningCLI over :class:`robusttrain.training.Classifier` (and its subclasses) and
  :class:`robusttrain.data.ImageDataModule` (:mod:`robusttrain.training.lightning_cli`). Each run
  writes ``runs/<name>/version_<k>/`` holding ``config.yaml`` (the resolved config),
  ``metrics.csv`` and ``checkpoints/{best,last}.ckpt``.
* ``robusttrain robustness ...`` — accuracy under weight noise (:mod:`robusttrain.commands.robustness`).
* ``robusttrain compare ...`` — train several methods and compare them under weight noise
  (:mod:`robusttrain.commands.compare`).
* ``robusttrain attack ...`` — black-box adversarial attacks on checkpoints
  (:mod:`robusttrain.commands.attack`).
* ``robusttrain meta-train ...`` — meta-train a learned attack optimizer
  (:mod:`robusttrain.commands.meta_train`).

``robusttrain --help`` lists all eight. Anticipated bad input (:mod:`robusttrain.commands.errors`)
ends a subcommand with one line on stderr and exit code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from robusttrain.commands import attack, compare, meta_train, robustness
from robusttrain.commands.errors import USAGE_ERROR, one_line_error
from robusttrain.training.lightning_cli import make_cli

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> the one line `robusttrain --help` shows for it
SUBCOMMANDS: dict[str, str] = {
    "fit": "Train a model from a config: robusttrain fit --config configs/x.yaml",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation split.",
    "test": "Evaluate a checkpoint (--ckpt_path) on the test split.",
    "predict": "Write a checkpoint's predictions (--ckpt_path) on a split to predictions.csv.",
    "robustness": robustness.DESCRIPTION,
    "compare": compare.DESCRIPTION,
    "attack": attack.DESCRIPTION,
    "meta-train": meta_train.DESCRIPTION,
}


def _help() -> str:
    rows = "\n".join(f"  {name:<12}{text}" for name, text in SUBCOMMANDS.items())
    return (
        f"usage: robusttrain {{{','.join(SUBCOMMANDS)}}} ...\n\n"
        "Train networks whose accuracy survives weight noise, and measure it.\n\n"
        f"subcommands:\n{rows}\n\n"
        "`robusttrain <subcommand> --help` lists a subcommand's options."
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``robusttrain`` console script.

    Args:
        argv: the arguments after ``robusttrain``; default ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on bad input (after printing one line to stderr).
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command in ("-h", "--help"):
        print(_help())
        return 0
    if command is None:
        print(_help(), file=sys.stderr)
        return USAGE_ERROR
    with _quiet_lightning():
        if command == "robustness":
            return robustness.main(argv[1:])
        if command == "compare":
            return compare.main(argv[1:])
        if command == "attack":
            return attack.main(argv[1:])
        if command == "meta-train":
            return meta_train.main(argv[1:])
        if not command.startswith("-") and command not in SUBCOMMANDS:
            print(f"robusttrain: error: unknown subcommand {command!r}; choose one of "
                  f"{', '.join(SUBCOMMANDS)} (see robusttrain --help)", file=sys.stderr)
            return USAGE_ERROR
        try:
            make_cli(None if from_command_line else argv)
        except (ValueError, ArithmeticError) as err:  # DatasetError, NonFiniteLossError, ...
            message = one_line_error(err)
            if message is None:
                raise
            name = f"robusttrain {command}" if command in SUBCOMMANDS else "robusttrain"
            print(f"{name}: error: {message}", file=sys.stderr)
            return USAGE_ERROR
    return 0


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide two messages Lightning prints on every run that say nothing about the run.

    * A ``FutureWarning`` "`isinstance(treespec, LeafSpec)` is deprecated", raised by Lightning's
      own ``lightning/pytorch/utilities/_pytree.py``, which still builds torch's deprecated
      ``LeafSpec``: neither robusttrain nor a config can avoid it, and only a Lightning release
      that stops calling it removes it. Matched by its exact text, so other warnings still show.
    * The "💡 Tip" that advertises litlogger, logged when a Trainer has no LitLogger.
    """
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        log.addFilter(_not_litlogger_tip)
        try:
            yield
        finally:
            log.removeFilter(_not_litlogger_tip)


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


if __name__ == "__main__":
    sys.exit(main())

"""The LightningCLI that builds a run from a YAML config: ``robusttrain fit|validate|test|predict``.

:func:`make_cli` builds a LightningCLI over :class:`robusttrain.training.Classifier` (and its
subclasses) and :class:`robusttrain.data.ImageDataModule`. Each run writes
``runs/<name>/version_<k>/`` holding ``config.yaml`` (the resolved config), ``metrics.csv`` and
``checkpoints/{best,last}.ckpt``. The comparison trains its runs through it too.

``validate``, ``test`` and ``predict`` of a checkpoint in such a ``checkpoints/`` folder log beside
it, into ``version_<k>/<subcommand>_<checkpoint>/`` (``test_last/config.yaml`` and
``test_last/metrics.csv`` for ``last.ckpt``; ``predict_best/predictions.csv`` for ``best.ckpt``):
the fit's own ``config.yaml`` and ``metrics.csv`` stay as they are (a CSVLogger pointed at the
version folder itself would delete its ``metrics.csv``), and testing the same checkpoint again
replaces only that folder. ``--predictions.path``
(:class:`robusttrain.training.predict.PredictionWriter`) writes the predictions elsewhere.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from robusttrain.data import ImageDataModule
from robusttrain.training.backprop import Classifier
from robusttrain.training.checkpoints import (
    BestAndLastCheckpoint,
    CheckpointError,
    check_checkpoint_file,
)
from robusttrain.training.divergence import DivergenceGuard
from robusttrain.training.option_errors import OptionError, explain_parse_error
from robusttrain.training.predict import PredictionWriter
from robusttrain.training.wall_clock import WallClock

__all__ = ["RUNS_DIR", "RobustTrainCLI", "make_cli"]

RUNS_DIR = "runs"

# --ckpt_path values that Lightning resolves itself rather than reading a file
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class RobustTrainCLI(LightningCLI):
    """LightningCLI with robusttrain's defaults: CSV logs and best/last checkpoints under ``runs/``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(WallClock, "wall_clock")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, raising its errors (explained by :meth:`parse_arguments`) and taking
        no abbreviated options: argparse would read ``--trainer.max_epoch 3`` as
        ``--trainer.max_epochs 3``."""
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` when given, else the command line, without Lightning's warning.

        Lightning warns whenever ``args`` is given while ``sys.argv`` holds arguments too, to catch
        a script that forgets which one it meant. robusttrain passes ``args`` only on purpose: the
        comparison builds each run from its own ``fit_config.yaml`` while ``sys.argv`` holds
        ``compare --config ...``, so the warning would print once per trained run and say nothing.

        Raises:
            OptionError: an unknown option or config key, or a value of the wrong type, in one
                line (:func:`~robusttrain.training.option_errors.explain_parse_error`).
        """
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as err:
            argv = None if isinstance(args, (dict, Namespace)) else list(
                sys.argv[1:] if args is None else args)
            raise OptionError(explain_parse_error(str(err), self._failed_parser(argv), argv)) from None

    def _failed_parser(self, argv: list[str] | None) -> LightningArgumentParser:
        """The parser whose options a failed command line was checked against: its subcommand's."""
        subcommands = getattr(self, "_subcommand_parsers", {})
        return next((subcommands[a] for a in argv or [] if a in subcommands), self.parser)

    def _parse_ckpt_path(self) -> None:
        # The model's settings come from --config; a checkpoint holds only part of them (its
        # backbone and optimizer are not hyperparameters), so they are not merged back from it.
        return

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # run=False (the comparison): no --ckpt_path to look at
            return
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        _check_ckpt_path(str(ckpt_path), self.subcommand)
        if self.subcommand in ("validate", "test", "predict"):
            _log_beside_run(config, self.subcommand, Path(ckpt_path))


def _check_ckpt_path(ckpt_path: str, subcommand: str) -> None:
    """Fail in one line before anything is built when ``--ckpt_path`` names no usable checkpoint.

    Lightning's loader ends an empty, cut short or foreign file in a traceback from inside torch;
    :func:`check_checkpoint_file` reads only the file's index, so the checkpoint is not loaded
    twice.
    """
    if ckpt_path in _CKPT_KEYWORDS or ckpt_path.lower().startswith("registry:") or "://" in ckpt_path:
        return  # resolved by Lightning (a keyword, its model registry, a remote file system)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} is not a file; pass a checkpoint written by `robusttrain "
            "fit`, e.g. runs/<name>/version_<k>/checkpoints/last.ckpt"
        )

    def advice(sibling: Path | None) -> str:
        if sibling is not None:
            verb = "resume from it" if subcommand == "fit" else "use it"
            return f"{sibling.name} in the same folder is whole: {verb} with --ckpt_path {sibling}"
        if subcommand == "fit":
            return "no other checkpoint in its folder is whole: start the run again without --ckpt_path"
        return "pass a checkpoint written by `robusttrain fit`"

    check_checkpoint_file(ckpt_path, option="--ckpt_path", advice=advice)


def _log_beside_run(config: Namespace, subcommand: str, ckpt: Path) -> None:
    """Log to ``<run>/<subcommand>_<stem>/`` when ``ckpt`` is ``<run>/checkpoints/<stem>.ckpt``.

    Only a CSVLogger is redirected; another logger (or none) keeps its own layout.
    """
    logger = config.trainer.get("logger")
    if ckpt.parent.name != "checkpoints" or not isinstance(logger, Namespace):
        return
    if logger.get("class_path", "").rsplit(".", 1)[-1] != "CSVLogger":
        return
    logger.init_args.save_dir = str(ckpt.parent.parent)
    logger.init_args.name = ""
    logger.init_args.version = f"{subcommand}_{ckpt.stem}"


def make_cli(args: list[str] | None = None, run: bool = True) -> RobustTrainCLI:
    """Build (and by default run) the LightningCLI; ``args`` as on the command line."""
    return RobustTrainCLI(
        Classifier,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": RUNS_DIR,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": RUNS_DIR, "name": "default"},
            },
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )

"""The ``robusttrain`` command.

* ``robusttrain fit|validate|test|predict --config configs/x.yaml [--model.init_args.sigma 0.05 ...]``
  — LightningCLI over :class:`robusttrain.training.Classifier` (and its subclasses) and
  :class:`robusttrain.data.ImageDataModule`. Each run writes ``runs/<name>/version_<k>/`` holding
  ``config.yaml`` (the resolved config), ``metrics.csv`` and ``checkpoints/{best,last}.ckpt``.
* ``robusttrain robustness ...`` — accuracy under weight noise (:mod:`robusttrain.evaluation`).
* ``robusttrain compare ...`` — train several methods and compare them under weight noise
  (:mod:`robusttrain.comparison`).
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from robusttrain.data import ImageDataModule
from robusttrain.training.modules import Classifier

RUNS_DIR = "runs"


class RobustTrainCLI(LightningCLI):
    """LightningCLI with robusttrain's defaults: CSV logs and best/last checkpoints under ``runs/``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        # The model's settings come from --config; a checkpoint holds only part of them (its
        # backbone and optimizer are not hyperparameters), so they are not merged back from it.
        return


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``robusttrain`` console script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "robustness":
        from robusttrain.commands.robustness import main as robustness_main

        return robustness_main(argv[1:])
    if argv and argv[0] == "compare":
        from robusttrain.commands.compare import main as compare_main

        return compare_main(argv[1:])
    make_cli(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The LightningCLI that builds a run from a YAML config: ``robusttrain fit|validate|test|predict``.

:func:`make_cli` builds a LightningCLI over :class:`robusttrain.training.Classifier` (and its
subclasses) and :class:`robusttrain.data.ImageDataModule`. Each run writes
``runs/<name>/version_<k>/`` holding ``config.yaml`` (the resolved config), ``metrics.csv`` and
``checkpoints/{best,last}.ckpt``. The comparison trains its runs through it too.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from robusttrain.data import ImageDataModule
from robusttrain.training.modules import Classifier

__all__ = ["RUNS_DIR", "RobustTrainCLI", "make_cli"]

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

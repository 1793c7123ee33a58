"""Training: the LightningModules, their checkpoints, and the LightningCLI that builds a run.

* One module per trainer: :mod:`~robusttrain.training.backprop` — :class:`Classifier` (backprop,
  and the base every trainer derives from); :mod:`~robusttrain.training.zeroth_order` —
  :class:`ZerothOrderClassifier` (forward passes only); :mod:`~robusttrain.training.noise_injection`
  — :class:`NoiseInjectionClassifier` (backprop on the smoothed loss);
  :mod:`~robusttrain.training.quantization_aware` — :class:`QuantizationAwareClassifier` (backprop
  through a deployment, straight-through); :mod:`~robusttrain.training.hardware_aware` —
  :class:`HardwareAwareClassifier` (IBM's HWA training run by aihwkit-lightning, the optional
  ``analog`` extra); :mod:`~robusttrain.training.chip_in_the_loop` —
  :class:`ChipInTheLoopClassifier` (forward-only fine-tuning of one black-box chip).
  :mod:`~robusttrain.training.base` holds what they share (seeds, ``init_from``, frozen
  BatchNorm/dropout). In configs: ``robusttrain.training.Classifier`` and so on
  (``robusttrain.training.modules.<Class>``, the former path, still imports).
* :mod:`robusttrain.training.checkpoints` — :func:`load_checkpoint`: the trained backbone and its
  data settings from a checkpoint, without executing code from it; :func:`check_checkpoint_file`:
  one line for a damaged or foreign checkpoint, naming a whole one beside it.
* :mod:`robusttrain.training.wall_clock` — :class:`WallClock`: ``time/fit_s`` beside ``val/acc``
  in ``metrics.csv``, carried across a resume.
* :mod:`robusttrain.training.predict` — :class:`PredictionWriter`, the CSV of ``robusttrain predict``.
* :mod:`robusttrain.training.option_errors` — :class:`OptionError`: one line for a mistyped option
  or config key (with the closest valid ones) or a value of the wrong type.
* :mod:`robusttrain.training.lightning_cli` — :class:`RobustTrainCLI` and :func:`make_cli`, the
  LightningCLI of ``robusttrain fit|validate|test|predict``, also used to train comparison runs.
"""

from robusttrain.training.backprop import Classifier
from robusttrain.training.base import frozen_stochastic_layers
from robusttrain.training.checkpoints import (
    CHECKPOINT_FORMAT,
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    CheckpointError,
    CheckpointWriteError,
    LoadedCheckpoint,
    check_checkpoint_file,
    load_checkpoint,
)
from robusttrain.training.chip_in_the_loop import ChipInTheLoopClassifier
from robusttrain.training.divergence import DivergenceError, DivergenceGuard
from robusttrain.training.hardware_aware import HardwareAwareClassifier
from robusttrain.training.lightning_cli import RobustTrainCLI, make_cli
from robusttrain.training.noise_injection import NoiseInjectionClassifier
from robusttrain.training.option_errors import OptionError
from robusttrain.training.predict import PredictionWriter
from robusttrain.training.quantization_aware import QuantizationAwareClassifier
from robusttrain.training.wall_clock import WallClock
from robusttrain.training.zeroth_order import ZerothOrderClassifier

__all__ = [
    "CHECKPOINT_FORMAT",
    "AtomicCheckpointIO",
    "BestAndLastCheckpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "ChipInTheLoopClassifier",
    "Classifier",
    "DivergenceError",
    "DivergenceGuard",
    "HardwareAwareClassifier",
    "LoadedCheckpoint",
    "NoiseInjectionClassifier",
    "OptionError",
    "PredictionWriter",
    "QuantizationAwareClassifier",
    "RobustTrainCLI",
    "WallClock",
    "ZerothOrderClassifier",
    "check_checkpoint_file",
    "frozen_stochastic_layers",
    "load_checkpoint",
    "make_cli",
]

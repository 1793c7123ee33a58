"""Training: the LightningModules, their checkpoints, and the LightningCLI that builds a run.

* :mod:`robusttrain.training.modules` — :class:`Classifier` (backprop), :class:`ZerothOrderClassifier`
  (forward passes only), :class:`NoiseInjectionClassifier` (backprop on the smoothed loss) and
  :class:`QuantizationAwareClassifier` (backprop through a deployment, straight-through); in
  configs ``robusttrain.training.Classifier`` and so on.
* :mod:`robusttrain.training.checkpoints` — :func:`load_checkpoint`: the trained backbone and its
  data settings from a checkpoint, without executing code from it.
* :mod:`robusttrain.training.lightning_cli` — :class:`RobustTrainCLI` and :func:`make_cli`, the
  LightningCLI of ``robusttrain fit|validate|test|predict``, also used to train comparison runs.
"""

from robusttrain.training.checkpoints import (
    CHECKPOINT_FORMAT,
    BestAndLastCheckpoint,
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
)
from robusttrain.training.lightning_cli import RobustTrainCLI, make_cli
from robusttrain.training.modules import (
    Classifier,
    NoiseInjectionClassifier,
    QuantizationAwareClassifier,
    ZerothOrderClassifier,
    frozen_stochastic_layers,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "BestAndLastCheckpoint",
    "CheckpointError",
    "Classifier",
    "LoadedCheckpoint",
    "NoiseInjectionClassifier",
    "QuantizationAwareClassifier",
    "RobustTrainCLI",
    "ZerothOrderClassifier",
    "frozen_stochastic_layers",
    "load_checkpoint",
    "make_cli",
]

"""The former home of the four trainers, kept so that class paths in existing configs still import.

``robusttrain.training.modules.ZerothOrderClassifier`` and the others are the classes of
:mod:`robusttrain.training.backprop`, :mod:`robusttrain.training.zeroth_order`,
:mod:`robusttrain.training.noise_injection` and :mod:`robusttrain.training.quantization_aware`;
new configs name them ``robusttrain.training.<Class>``.
"""

from robusttrain.training.backprop import Classifier
from robusttrain.training.base import frozen_stochastic_layers
from robusttrain.training.noise_injection import NoiseInjectionClassifier
from robusttrain.training.quantization_aware import QuantizationAwareClassifier
from robusttrain.training.zeroth_order import ZerothOrderClassifier

__all__ = [
    "Classifier",
    "NoiseInjectionClassifier",
    "QuantizationAwareClassifier",
    "ZerothOrderClassifier",
    "frozen_stochastic_layers",
]

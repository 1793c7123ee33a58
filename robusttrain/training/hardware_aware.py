r"""IBM's hardware-aware (HWA) training: :class:`HardwareAwareClassifier`, backprop through the
analog layers of aihwkit-lightning.

The analog-AI field trains networks for in-memory hardware with IBM's HWA training (Joshi et al.
2020, "Accurate deep neural network inference using computational phase-change memory", Nat.
Commun. 11, 2473; Rasch et al. 2023, "Hardware-aware training for large-scale and diverse deep
learning inference workloads using in-memory computing-based accelerators", Nat. Commun. 14,
5282), implemented for PyTorch by IBM's aihwkit-lightning. This trainer runs *their* code, so a
reader from that field can put its models beside robusttrain's: the backbone is converted with
``aihwkit_lightning.nn.conversion.convert_to_analog`` and every training forward pass goes through
its ``AnalogLinear`` / ``AnalogConv2d`` layers, which add Gaussian weight noise per mini-batch, and
after every optimizer step each analog layer clips its weights with its own ``clip_weights()``
(the ``step_post_hook`` of ``aihwkit_lightning.optim.AnalogOptimizer``).

Settings, and why (``TorchInferenceRPUConfig`` fields):

* ``modifier.noise_type = AddNormal`` (``per_channel``: ``AddNormalPerChannel``), ``std_dev =
  level``: W + level·max|W|·τ, τ ~ N(0, I), with max|W| over the whole weight tensor (per output
  row with ``per_channel``) — exactly robusttrain's relative noise at η = level
  (:mod:`robusttrain.noise.weight`; the per-tensor form is checked against it in
  tests/test_hardware_aware.py). Biases stay clean, as in both codes.
* ``clip.type = LayerGaussianPerChannel``, ``clip.sigma = clip_sigma`` (2.5 by default, inside the
  [2.0, 3.5] the aihwkit-lightning user guide recommends): each output row clipped to ±clip_sigma
  times its standard deviation after every step. It lowers max|W| against the bulk of the weights,
  the lever HWA training adds to plain noise injection; ``clip_sigma: null`` turns it off (then
  the method is :class:`~robusttrain.training.NoiseInjectionClassifier` with ``noise: relative``
  run by IBM's code).
* No input quantization (``forward.inp_res``), output noise, ADC bound or input-range learning:
  robusttrain's evaluation models the weights only (``robusttrain robustness``, the deployments,
  the ``pcm`` step), and these change the function the network computes, so a model trained with
  them would be evaluated as a different network than the one trained.

The analog copy shares its parameters and buffers with ``self.backbone`` (the same tensors), and it
is not a registered submodule: checkpoints hold the plain backbone, so ``robusttrain robustness``,
``compare``, ``test`` and the deployment evaluation read them like any other, without
aihwkit-lightning. Evaluation (validation and test) runs the plain backbone: with the settings above
an analog layer in eval mode computes the same function.

Needs the optional extra: ``pip install 'robusttrain[analog]'`` (aihwkit-lightning 2.1.0, pure
Python, CPU or GPU).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from robusttrain.training.backprop import Classifier

__all__ = ["ANALOG_EXTRA", "HardwareAwareClassifier", "analog_twin", "hwa_rpu_config",
           "import_aihwkit_lightning"]

ANALOG_EXTRA = "pip install 'robusttrain[analog]'  (adds IBM's aihwkit-lightning==2.1.0)"


def import_aihwkit_lightning() -> ModuleType:
    """Import aihwkit-lightning, or say in one line how to get it.

    Its import prints a note about triton on machines without it; that note is swallowed.

    Raises:
        ImportError: aihwkit-lightning is not installed (the message gives the install command).
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module("aihwkit_lightning.nn.modules.linear")
            return importlib.import_module("aihwkit_lightning")
    except ImportError as err:
        raise ImportError(
            f"hardware-aware training (method hwa) runs IBM's aihwkit-lightning, which is not "
            f"installed ({err}); get it with: {ANALOG_EXTRA}"
        ) from None


def hwa_rpu_config(level: float, per_channel: bool = False, clip_sigma: float | None = 2.5) -> Any:
    """The aihwkit-lightning ``TorchInferenceRPUConfig`` of :class:`HardwareAwareClassifier`.

    Args:
        level: ``modifier.std_dev``, the weight noise relative to max|W| (η of relative noise).
        per_channel: max|W| per output row (``AddNormalPerChannel``) instead of per tensor.
        clip_sigma: ``clip.sigma`` of ``LayerGaussianPerChannel`` clipping; ``None``: no clipping.
    """
    import_aihwkit_lightning()
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightClipType,
        WeightNoiseInjectionType,
    )

    config = TorchInferenceRPUConfig()
    config.modifier.noise_type = (WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL if per_channel
                                  else WeightNoiseInjectionType.ADD_NORMAL)
    config.modifier.std_dev = float(level)
    if clip_sigma is not None:
        config.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
        config.clip.sigma = float(clip_sigma)
    return config


def analog_twin(backbone: nn.Module, rpu_config: Any) -> nn.Module:
    """``convert_to_analog(backbone)`` whose parameters and buffers *are* the backbone's tensors.

    The converted copy keeps the backbone's module names, so each of its modules takes the
    parameters and buffers of the backbone module of the same name: a step on the backbone moves
    the analog copy, a clip of an analog layer clips the backbone, and BatchNorm statistics updated
    in the analog forward pass are the backbone's. Tensors only the analog layers have (none with
    :func:`hwa_rpu_config`) stay their own.

    Raises:
        ValueError: a backbone parameter has no counterpart in the analog copy.
    """
    import_aihwkit_lightning()
    from aihwkit_lightning.nn.conversion import convert_to_analog

    with contextlib.redirect_stdout(io.StringIO()):
        twin = convert_to_analog(backbone, rpu_config)
    own = dict(backbone.named_modules())
    tied = 0
    for name, module in twin.named_modules():
        source = own.get(name)
        if source is None:
            continue
        for key, value in source._parameters.items():
            if key in module._parameters:
                module._parameters[key] = value
                tied += value is not None
        for key, value in source._buffers.items():
            if key in module._buffers:
                module._buffers[key] = value
    expected = sum(1 for _ in backbone.parameters())
    if tied != expected:
        raise ValueError(
            f"the analog copy of {type(backbone).__name__} matched {tied} of its {expected} "
            "parameters by name; hwa needs a backbone whose layers convert_to_analog keeps in place"
        )
    return twin


def analog_layers(twin: nn.Module) -> list[nn.Module]:
    """The analog layers of an :func:`analog_twin`, as aihwkit-lightning selects them.

    Its ``AnalogLayerBase.named_analog_layers``: every ``AnalogLayerBase`` that is not a container
    (``AnalogLinear``, ``AnalogConv1d/2d/3d``; the analog conv layers are not ``nn.Conv2d``
    subclasses, so an ``isinstance`` test on torch's classes would miss them).
    """
    from aihwkit_lightning.nn import AnalogLayerBase

    return [m for m in twin.modules() if isinstance(m, AnalogLayerBase) and not m.IS_CONTAINER]


class HardwareAwareClassifier(Classifier):
    """IBM's hardware-aware training: backprop through aihwkit-lightning's noisy analog layers.

    Each training step runs the batch through the analog copy of the backbone
    (:func:`analog_twin`), where every Linear/convolution weight gets a fresh draw of
    W + level·max|W|·τ for this mini-batch, backpropagates to the shared clean weights, steps the
    optimizer and clips each output row of the weights to ±``clip_sigma`` standard deviations
    (module docstring: which aihwkit-lightning settings, and why). The noise draws come from the
    global RNG, which :class:`Classifier` reseeds before every batch from (seed, epoch, batch), so
    a resumed run draws what the uninterrupted one drew.

    Args:
        backbone, optimizer, scheduler, num_classes, seed, deployment, init_from: see
            :class:`Classifier`.
        noise: the noise model ``level`` is in; only ``"relative"`` (what aihwkit-lightning's
            ``AddNormal`` is), named so that comparison files can give ``levels:`` as for the
            other smoothed methods.
        level: η_train, the ``std_dev`` of the injected weight noise relative to max|W|.
        per_channel: max|W| per output row (``AddNormalPerChannel``).
        clip_sigma: weight clipping in standard deviations per output row after every step
            (``LayerGaussianPerChannel``); ``None``: no clipping.

    Raises:
        ImportError: aihwkit-lightning is not installed (``pip install 'robusttrain[analog]'``).
    """

    method = "hwa"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        noise: Literal["relative"] = "relative",
        level: float = 0.05,
        per_channel: bool = False,
        clip_sigma: float | None = 2.5,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
    ) -> None:
        if noise != "relative":
            raise ValueError(
                f"hwa injects aihwkit-lightning's AddNormal noise, which is relative noise "
                f"(level·max|W|); got noise={noise!r}: set noise: relative"
            )
        if isinstance(level, bool) or not isinstance(level, int | float) or not (
                math.isfinite(level) and level > 0):
            raise ValueError(f"level must be a positive number (η_train of relative noise), got "
                             f"{level!r}")
        if clip_sigma is not None and (isinstance(clip_sigma, bool) or not isinstance(
                clip_sigma, int | float) or not (math.isfinite(clip_sigma) and clip_sigma > 0)):
            raise ValueError(f"clip_sigma must be a positive number of standard deviations or "
                             f"null (no clipping), got {clip_sigma!r}")
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        self.noise = noise
        self.level = float(level)
        self.per_channel = bool(per_channel)
        self.clip_sigma = None if clip_sigma is None else float(clip_sigma)
        twin = analog_twin(self.backbone, hwa_rpu_config(self.level, self.per_channel,
                                                         self.clip_sigma))
        # kept out of the module tree: the checkpoint holds the plain backbone only
        self.__dict__["_analog"] = twin
        self.__dict__["_analog_layers"] = analog_layers(twin)

    @property
    def analog(self) -> nn.Module:
        """The analog copy of the backbone the training steps run (shares its tensors)."""
        return self.__dict__["_analog"]

    def on_fit_start(self) -> None:
        # the shared tensors are already on the device; this moves any the analog layers own
        self.analog.to(self.device)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.analog.train(self.training)
        logits = self.analog(x)
        loss = F.cross_entropy(logits, y)
        self._log_train(loss, logits, y)
        return loss

    def clip_weights(self) -> None:
        """Each analog layer's ``clip_weights()`` (a no-op without ``clip_sigma``)."""
        with torch.no_grad():
            for layer in self.__dict__["_analog_layers"]:
                layer.clip_weights()

    def configure_optimizers(self) -> Any:
        configured = super().configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        # what aihwkit_lightning.optim.AnalogOptimizer does: clip after every step
        optimizer.register_step_post_hook(lambda *_: self.clip_weights())
        return configured

    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta.update(noise=self.noise, level=self.level, per_channel=self.per_channel,
                    clip_sigma=self.clip_sigma)
        return meta

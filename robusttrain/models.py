"""Plain ``nn.Module`` backbones (no Lightning inside).

Every backbone records the arguments it was built with in ``self.spec`` (a ``class_path`` /
``init_args`` dict, the same shape LightningCLI uses), so a checkpoint can rebuild it without
unpickling anything: see :func:`build_backbone`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["MLP", "LeNet", "ResNet20", "build_backbone", "count_parameters"]


class _SpecMixin:
    """Stores ``{"class_path": ..., "init_args": ...}`` so the module can be rebuilt from plain data."""

    def _record_spec(self, **init_args: Any) -> None:
        cls = type(self)
        self.spec = {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in init_args.items()},
        }


class MLP(_SpecMixin, nn.Module):
    """Fully connected classifier: flatten, then ``Linear -> ReLU`` per hidden width, then ``Linear``.

    Args:
        in_features: number of input values per example (784 for 28x28 images).
        hidden: widths of the hidden layers, e.g. ``[128]`` for 784-128-10.
        num_classes: number of output logits.
        dropout: dropout probability after each hidden activation (0 disables it).

    Example:
        >>> model = MLP(784, [128], 10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (128,),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_features <= 0 or num_classes <= 1 or any(w <= 0 for w in hidden):
            raise ValueError(
                f"MLP needs positive sizes and num_classes >= 2, got in_features={in_features}, "
                f"hidden={list(hidden)}, num_classes={num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP dropout must be in [0, 1), got {dropout}")
        self._record_spec(
            in_features=in_features, hidden=list(hidden), num_classes=num_classes, dropout=dropout
        )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(_SpecMixin, nn.Module):
    """LeNet-style CNN for 28x28 (or 32x32) images.

    ``conv(5x5, c1) -> ReLU -> maxpool 2 -> conv(5x5, c2) -> ReLU -> maxpool 2 -> fc -> ReLU -> fc``.

    Args:
        in_channels: image channels (1 for MNIST/Fashion-MNIST, 3 for CIFAR-10).
        num_classes: number of output logits.
        channels: output channels of the two convolutions.
        hidden: width of the hidden fully connected layer.
        image_size: side of the square input image (28 or 32).

    Example:
        >>> LeNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (6, 16),
        hidden: int = 120,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if len(channels) != 2 or any(c <= 0 for c in channels):
            raise ValueError(f"LeNet channels must be two positive ints, got {list(channels)}")
        if image_size < 12:
            raise ValueError(f"LeNet image_size must be at least 12, got {image_size}")
        self._record_spec(
            in_channels=in_channels,
            num_classes=num_classes,
            channels=list(channels),
            hidden=hidden,
            image_size=image_size,
        )
        c1, c2 = channels
        side = ((image_size - 4) // 2 - 4) // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'batch', 'group' or 'none'")


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(_SpecMixin, nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, Sec. 4.2): 3 stages of 3 basic blocks, widths 16/32/64.

    Args:
        num_classes: number of output logits.
        norm: ``"batch"`` (BatchNorm), ``"group"`` (GroupNorm, whose statistics do not depend on the
            batch and so behave the same under weight noise in training and evaluation) or ``"none"``.
        width: channels of the first stage (16 in the paper); later stages double it.
        groups: GroupNorm groups (ignored for other norms).
        in_channels: image channels.

    Example:
        >>> ResNet20(norm="group")(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        norm: Literal["batch", "group", "none"] = "batch",
        width: int = 16,
        groups: int = 8,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self._record_spec(
            num_classes=num_classes, norm=norm, width=width, groups=groups, in_channels=in_channels
        )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(norm, width, groups), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(c_in, c_out, stride, norm, groups))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


_ALLOWED_PREFIX = "robusttrain.models."


def build_backbone(spec: object) -> nn.Module:
    """Rebuild a backbone from its ``spec`` (as stored in a robusttrain checkpoint).

    Only classes defined in :mod:`robusttrain.models` are accepted, so a checkpoint cannot make
    this function import or run arbitrary code. ``spec`` comes from a file, so any value is
    checked: a dict with a ``class_path`` and optional ``init_args``.

    Raises:
        ValueError: the spec is malformed or names a class outside ``robusttrain.models``.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"backbone spec must be a dict with a 'class_path', got {spec!r}")
    path = spec["class_path"]
    if not path.startswith(_ALLOWED_PREFIX) or path.count(".") != 2:
        raise ValueError(
            f"backbone class {path!r} is not a robusttrain model; only classes in "
            f"robusttrain.models can be rebuilt from a checkpoint"
        )
    cls = getattr(importlib.import_module("robusttrain.models"), path.rsplit(".", 1)[1], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"backbone class {path!r} does not exist in robusttrain.models")
    return cls(**spec.get("init_args", {}))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

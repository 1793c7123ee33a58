"""The comparison file: which methods to train on which network, data and seeds, and how to
evaluate them under weight noise.

``robusttrain compare --config experiments/fashion_mlp.yaml`` reads one YAML file::

    name: fashion_mlp                    # results go to experiments/results/<name>/ (or --out)
    seeds: [0, 1, 2]
    trainer: {max_epochs: 3}             # the same budget for every method
    data: {class_path: robusttrain.data.FashionMNISTDataModule, init_args: {batch_size: 128}}
    backbone: {class_path: robusttrain.models.MLP, init_args: {hidden: [128]}}
    methods:
      sgd_momentum:
        model: {class_path: robusttrain.training.Classifier}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}
      zo_nesterov:
        model: {class_path: robusttrain.training.ZerothOrderClassifier, init_args: {num_pairs: 16}}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9, nesterov: true}}
        sigmas: [0.001, 0.01, 0.1]         # one run per smoothing scale
    robustness: {noise: relative, levels: [0, 0.05, 0.1, 0.2], draws: 50, seed: 0}

:func:`load_config` reads and checks it (:class:`CompareConfigError` names a missing or wrong entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ROBUSTNESS_DEFAULTS",
    "CompareConfig",
    "CompareConfigError",
    "MethodSpec",
    "load_config",
]


@dataclass
class MethodSpec:
    """One training method of a comparison (see the module docstring for the YAML form)."""

    name: str
    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    sigmas: list[float] | None = None

    def variants(self) -> list[float | None]:
        return list(self.sigmas) if self.sigmas else [None]


@dataclass
class CompareConfig:
    """A parsed comparison file."""

    name: str
    seeds: list[int]
    methods: list[MethodSpec]
    backbone: dict[str, Any]
    data: dict[str, Any]
    trainer: dict[str, Any] = field(default_factory=dict)
    robustness: dict[str, Any] = field(default_factory=dict)


class CompareConfigError(ValueError):
    """A comparison file with a missing or wrong entry; the message names it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CompareConfigError(message)


def load_config(path: str | Path) -> CompareConfig:
    """Read and check a comparison YAML file.

    Raises:
        CompareConfigError: a missing key, an empty method list, a non-positive sigma, ...
    """
    path = Path(path)
    _require(path.is_file(), f"comparison config {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    _require(isinstance(raw, dict), f"{path}: expected a mapping at the top level")
    for key in ("methods", "backbone", "data"):
        _require(key in raw, f"{path}: missing '{key}:' entry")
    seeds = raw.get("seeds", [0])
    _require(
        isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds),
        f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}",
    )
    _require(len(set(seeds)) == len(seeds), f"{path}: 'seeds' has duplicates: {seeds}")
    methods = []
    _require(
        isinstance(raw["methods"], dict) and raw["methods"],
        f"{path}: 'methods' must map method names to their settings",
    )
    for name, spec in raw["methods"].items():
        _require(isinstance(spec, dict) and "model" in spec, f"{path}: method {name!r} needs 'model:'")
        model = spec["model"]
        _require(
            isinstance(model, dict) and isinstance(model.get("class_path"), str),
            f"{path}: method {name!r}: 'model' needs a class_path",
        )
        sigmas = spec.get("sigmas")
        if sigmas is not None:
            _require(
                isinstance(sigmas, list)
                and sigmas
                and all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in sigmas),
                f"{path}: method {name!r}: 'sigmas' must be a list of positive numbers, got {sigmas!r}",
            )
        methods.append(
            MethodSpec(
                name=str(name),
                model=model,
                optimizer=spec.get("optimizer"),
                scheduler=spec.get("scheduler"),
                sigmas=[float(s) for s in sigmas] if sigmas else None,
            )
        )
    robustness = dict(raw.get("robustness") or {})
    _check_robustness(path, robustness)
    return CompareConfig(
        name=str(raw.get("name", path.stem)),
        seeds=seeds,
        methods=methods,
        backbone=raw["backbone"],
        data=raw["data"],
        trainer=dict(raw.get("trainer") or {}),
        robustness=robustness,
    )


ROBUSTNESS_DEFAULTS: dict[str, Any] = {
    "noise": "relative",
    "levels": [0.0, 0.02, 0.05, 0.1, 0.2],
    "draws": 50,
    "seed": 0,
    "max_images": None,
}


def _check_robustness(path: Path, rob: dict[str, Any]) -> None:
    unknown = set(rob) - set(ROBUSTNESS_DEFAULTS)
    _require(not unknown, f"{path}: unknown 'robustness' entries {sorted(unknown)}; "
             f"valid: {sorted(ROBUSTNESS_DEFAULTS)}")
    levels = rob.get("levels", ROBUSTNESS_DEFAULTS["levels"])
    _require(
        isinstance(levels, list) and levels
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in levels),
        f"{path}: robustness 'levels' must be a list of numbers >= 0, got {levels!r}",
    )
    draws = rob.get("draws", ROBUSTNESS_DEFAULTS["draws"])
    _require(isinstance(draws, int) and draws >= 1,
             f"{path}: robustness 'draws' must be an integer >= 1, got {draws!r}")
    max_images = rob.get("max_images")
    _require(max_images is None or (isinstance(max_images, int) and max_images >= 1),
             f"{path}: robustness 'max_images' must be null or an integer >= 1, got {max_images!r}")


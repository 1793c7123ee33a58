"""The comparison file: which methods to train on which network, data and seeds, and how to
evaluate them under weight noise.

``robusttrain compare --config experiments/fashion_mlp.yaml`` reads one YAML file::

    name: fashion_mlp                    # results go to experiments/results/<name>/ (or --out)
    seeds: [0, 1, 2]
    trainer: {max_epochs: 3}             # the same budget for every method
    data: {class_path: robusttrain.data.FashionMNISTDataModule, init_args: {batch_size: 128}}
    backbone: {class_path: robusttrain.models.MLP, init_args: {hidden: [128]}}
    methods:
      sgd_momentum:                      # the first method is the reference of the report's drops
        model: {class_path: robusttrain.training.Classifier}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9}}
      zo_nesterov:
        model: {class_path: robusttrain.training.ZerothOrderClassifier, init_args: {num_pairs: 16}}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05, momentum: 0.9, nesterov: true}}
        sigmas: [0.001, 0.01, 0.1]         # one run per absolute smoothing scale σ
      noise_injection:
        model: {class_path: robusttrain.training.NoiseInjectionClassifier,
                init_args: {noise: relative}}
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}
        levels: [0.02, 0.05, 0.1]          # one run per smoothing level η_train
    robustness: {noise: relative, levels: [0, 0.05, 0.1, 0.2], draws: 50, seed: 0}

A method is trained once per seed and per *variant*:

* ``sigmas: [...]`` sets the model's ``sigma`` (absolute smoothing, w + σ·g): label
  ``"<method> σ=0.01"``, runs in ``runs/<method>/sigma0.01/seed<k>/``.
* ``levels: [...]`` sets the model's ``level`` η_train, in the units of the noise model named by the
  model's ``init_args.noise`` (``absolute``, ``relative`` or ``multiplicative``, the same meaning as
  ``robusttrain robustness --noise/--levels``): label ``"<method> η=0.05"``, runs in
  ``runs/<method>/level0.05/seed<k>/``. The model class must take ``level``.
* neither: one variant, label ``"<method>"``, runs in ``runs/<method>/seed<k>/``.

``robustness.noise`` is one noise model (a string: the output files are ``robustness.csv``,
``summary.json``, ``robustness.png``, ``frontier.png``) or a list of them (one folder of those four
files per noise model, ``<out>/<noise>/``); the first is the primary one. ``robustness.levels`` is one
list used for every noise model, or a mapping noise model -> list. Every noise model is evaluated
with the same draws seed, so the draws are paired across models and noise models.

:func:`load_config` reads and checks it (:class:`CompareConfigError` names a missing or wrong entry).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robusttrain.noise.weight import NOISE_MODELS

__all__ = [
    "ROBUSTNESS_DEFAULTS",
    "CompareConfig",
    "CompareConfigError",
    "MethodSpec",
    "RobustnessSpec",
    "Variant",
    "init_parameters",
    "load_config",
]


@dataclass(frozen=True)
class Variant:
    """One training setting of a method: an absolute σ, a level η_train, or neither."""

    sigma: float | None = None
    level: float | None = None

    def label(self, method: str) -> str:
        """``"<method>"``, ``"<method> σ=<sigma>"`` or ``"<method> η=<level>"``."""
        if self.level is not None:
            return f"{method} η={self.level:g}"
        if self.sigma is not None:
            return f"{method} σ={self.sigma:g}"
        return method

    def subdir(self) -> str | None:
        """The run folder below ``runs/<method>/``: ``sigma<σ>``, ``level<η>`` or none."""
        if self.level is not None:
            return f"level{self.level:g}"
        if self.sigma is not None:
            return f"sigma{self.sigma:g}"
        return None


@dataclass
class MethodSpec:
    """One training method of a comparison (see the module docstring for the YAML form)."""

    name: str
    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    sigmas: list[float] | None = None
    levels: list[float] | None = None

    @property
    def noise(self) -> str | None:
        """The training noise model (``model.init_args.noise``), None where the method has none."""
        return (self.model.get("init_args") or {}).get("noise")

    def variants(self) -> list[Variant]:
        if self.levels:
            return [Variant(level=v) for v in self.levels]
        if self.sigmas:
            return [Variant(sigma=s) for s in self.sigmas]
        return [Variant()]


@dataclass(frozen=True)
class RobustnessSpec:
    """The checked ``robustness:`` block.

    Attributes:
        levels: noise model -> its evaluation levels, sorted, 0 (the clean model) included; in the
            order of the file, the first being the primary noise model.
        draws: draws per level.
        seed: base seed of the draws, the same for every noise model (paired).
        max_images: evaluate on the first ``max_images`` test examples (None: all).
        per_noise_folders: ``noise`` was given as a list: each noise model's files go to
            ``<out>/<noise>/`` instead of ``<out>/``.
    """

    levels: dict[str, list[float]]
    draws: int
    seed: int
    max_images: int | None
    per_noise_folders: bool

    @property
    def primary(self) -> str:
        return next(iter(self.levels))

    def out_dir(self, out: Path, noise: str) -> Path:
        """Where the files of ``noise`` go: ``out`` or ``out/<noise>``."""
        return out / noise if self.per_noise_folders else out


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

    def robustness_spec(self) -> RobustnessSpec:
        """The ``robustness:`` block with defaults filled in, checked.

        Raises:
            CompareConfigError: an unknown entry or noise model, bad levels, draws, ...
        """
        return _robustness_spec(self.name, self.robustness)


class CompareConfigError(ValueError):
    """A comparison file with a missing or wrong entry; the message names it."""


def _require(cond: object, message: str) -> None:
    # cond is tested for truth: a non-empty list or mapping passes
    if not cond:
        raise CompareConfigError(message)


def init_parameters(class_path: str) -> set[str]:
    """The parameter names of ``class_path``'s ``__init__`` (the class is imported)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return set(inspect.signature(cls.__init__).parameters)


def _positive_numbers(values: Any) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in values)
        and len({float(v) for v in values}) == len(values)
    )


def _method(path: Path, name: str, spec: Any) -> MethodSpec:
    _require(isinstance(spec, dict) and "model" in spec, f"{path}: method {name!r} needs 'model:'")
    model = spec["model"]
    _require(
        isinstance(model, dict) and isinstance(model.get("class_path"), str),
        f"{path}: method {name!r}: 'model' needs a class_path",
    )
    sigmas, levels = spec.get("sigmas"), spec.get("levels")
    _require(sigmas is None or levels is None,
             f"{path}: method {name!r} gives both 'sigmas' and 'levels'; give one grid per method "
             "(sigmas: absolute σ; levels: η_train in the units of the model's 'noise')")
    for key, values in (("sigmas", sigmas), ("levels", levels)):
        _require(values is None or _positive_numbers(values),
                 f"{path}: method {name!r}: '{key}' must be a list of distinct positive numbers, "
                 f"got {values!r}")
    if levels is not None:
        class_path = model["class_path"]
        try:
            params = init_parameters(class_path)
        except (ImportError, AttributeError, ValueError) as err:
            raise CompareConfigError(
                f"{path}: method {name!r}: cannot import {class_path} to check that it takes "
                f"'level' ({err})") from err
        _require("level" in params,
                 f"{path}: method {name!r} gives 'levels' but {class_path}.__init__ has no 'level' "
                 "parameter; use 'sigmas:' for this class, or a smoothed training class that takes "
                 "'noise' and 'level' (robusttrain.training.ZerothOrderClassifier, "
                 "NoiseInjectionClassifier)")
        noise = (model.get("init_args") or {}).get("noise")
        _require(noise in NOISE_MODELS,
                 f"{path}: method {name!r} gives 'levels' (η_train) but its model init_args.noise is "
                 f"{noise!r}; set it to the noise model the levels are in, one of "
                 f"{', '.join(NOISE_MODELS)}")
    return MethodSpec(
        name=str(name),
        model=model,
        optimizer=spec.get("optimizer"),
        scheduler=spec.get("scheduler"),
        sigmas=[float(s) for s in sigmas] if sigmas else None,
        levels=[float(v) for v in levels] if levels else None,
    )


def load_config(path: str | Path) -> CompareConfig:
    """Read and check a comparison YAML file.

    Raises:
        CompareConfigError: a missing key, an empty method list, a non-positive sigma, ``levels``
            for a class without ``level``, an unknown noise model, ...
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
    _require(
        isinstance(raw["methods"], dict) and raw["methods"],
        f"{path}: 'methods' must map method names to their settings",
    )
    methods = [_method(path, name, spec) for name, spec in raw["methods"].items()]
    robustness = dict(raw.get("robustness") or {})
    _robustness_spec(str(path), robustness)
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


def _check_levels(where: str, levels: Any) -> list[float]:
    _require(
        isinstance(levels, list) and levels
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v >= 0 for v in levels),
        f"{where}: robustness 'levels' must be a list of numbers >= 0, got {levels!r}",
    )
    # level 0 (the clean model) is always evaluated: the drops are measured from it
    return sorted({0.0, *(float(v) for v in levels)})


def _robustness_spec(where: str, rob: dict[str, Any]) -> RobustnessSpec:
    unknown = set(rob) - set(ROBUSTNESS_DEFAULTS)
    _require(not unknown, f"{where}: unknown 'robustness' entries {sorted(unknown)}; "
             f"valid: {sorted(ROBUSTNESS_DEFAULTS)}")
    rob = {**ROBUSTNESS_DEFAULTS, **rob}
    noise = rob["noise"]
    noises = noise if isinstance(noise, list) else [noise]
    _require(bool(noises) and all(isinstance(n, str) for n in noises),
             f"{where}: robustness 'noise' must be a noise model or a non-empty list of them, "
             f"got {noise!r}")
    bad = [n for n in noises if n not in NOISE_MODELS]
    _require(not bad, f"{where}: unknown robustness noise model(s) {bad}; valid: "
             f"{', '.join(NOISE_MODELS)}")
    _require(len(set(noises)) == len(noises), f"{where}: robustness 'noise' has duplicates: {noises}")
    levels = rob["levels"]
    if isinstance(levels, dict):
        _require(set(levels) == set(noises),
                 f"{where}: robustness 'levels' maps noise models {sorted(levels)} but 'noise' "
                 f"names {noises}; give one list of levels per noise model, or one list for all")
        per_noise = {n: _check_levels(where, levels[n]) for n in noises}
    else:
        checked = _check_levels(where, levels)
        per_noise = {n: list(checked) for n in noises}
    draws = rob["draws"]
    _require(isinstance(draws, int) and not isinstance(draws, bool) and draws >= 1,
             f"{where}: robustness 'draws' must be an integer >= 1, got {draws!r}")
    seed = rob["seed"]
    _require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
             f"{where}: robustness 'seed' must be an integer >= 0, got {seed!r}")
    max_images = rob["max_images"]
    _require(max_images is None or (isinstance(max_images, int) and max_images >= 1),
             f"{where}: robustness 'max_images' must be null or an integer >= 1, got {max_images!r}")
    return RobustnessSpec(levels=per_noise, draws=draws, seed=seed, max_images=max_images,
                          per_noise_folders=isinstance(noise, list))

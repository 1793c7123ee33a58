"""``robusttrain robustness``: accuracy of trained checkpoints under weight noise.

``robusttrain robustness --ckpt A.ckpt --ckpt B.ckpt --noise relative --levels 0,0.05,0.1
--draws 50 --out DIR`` writes ``robustness.csv`` (one row per model, level and draw),
``summary.json`` and ``robustness.png`` (see :mod:`robusttrain.evaluation`).

With ``--deployment <preset or YAML>`` (or ``trained``: the deployment the checkpoints were
trained for, see :class:`robusttrain.training.Classifier`) the checkpoints are run through a
deployment instead (quantization, faults, read noise, converters;
:mod:`robusttrain.noise.deployment`) over
``--device-draws`` chips × ``--inference-draws`` runs each, optionally at every value of one
field (``--sweep quantize.bits=2,3,4,8``), and the command writes ``deployment.csv``,
``deployment.json`` and, with a sweep, ``deployment.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from robusttrain.commands.errors import OneLineParser, UsageError
from robusttrain.data import ImageDataModule
from robusttrain.evaluation.deployment import (
    evaluate_deployment,
    format_deployment_table,
    parse_sweep,
    write_deployment_report,
)
from robusttrain.evaluation.report import format_table, write_report
from robusttrain.evaluation.robustness import BN_MODES, evaluate_models, level_key
from robusttrain.noise import NOISE_MODELS, PRESETS, Deployment, parse_deployment
from robusttrain.training.checkpoints import LoadedCheckpoint, load_checkpoint

__all__ = ["DESCRIPTION", "checkpoints_and_data", "main"]

DESCRIPTION = "Accuracy of trained checkpoints under random perturbations of their weights."


def _parse_levels(text: str) -> list[float]:
    parts = [v.strip() for v in text.split(",") if v.strip()]
    try:
        levels = [float(v) for v in parts]
    except ValueError:
        raise UsageError(f"--levels must be comma-separated numbers >= 0, got {text!r}") from None
    if not levels or any(not math.isfinite(v) or v < 0 for v in levels):
        raise UsageError(f"--levels must be comma-separated numbers >= 0, got {text!r}")
    if len({level_key(v) for v in levels}) != len(levels):
        raise UsageError(f"--levels must be distinct, got {text!r}")
    return levels


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="robusttrain robustness", description=DESCRIPTION,
    )
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint written by `robusttrain fit` (repeatable)")
    parser.add_argument("--name", action="append", help="label of each checkpoint, in order")
    parser.add_argument("--noise", default="relative", help=f"one of {', '.join(NOISE_MODELS)}")
    parser.add_argument("--levels", default="0,0.02,0.05,0.1,0.2",
                        help="comma-separated noise levels (0, the clean model, is always added)")
    parser.add_argument("--draws", default="50", help="draws per level (default 50)")
    parser.add_argument("--seed", default="0", help="base seed of the draws (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--data-dir", help="override the data_dir saved in the checkpoint")
    parser.add_argument("--batch-size", default="2000", help="examples per forward pass")
    parser.add_argument("--bn-mode", choices=BN_MODES, default="keep",
                        help="keep the trained BatchNorm statistics or re-estimate them per draw")
    parser.add_argument("--bn-batches", default="10", help="batches for --bn-mode reestimate")
    parser.add_argument("--include-bias", action="store_true", help="perturb biases too")
    parser.add_argument("--include-norm", action="store_true",
                        help="perturb normalization weights and biases too")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    parser.add_argument("--deployment",
                        help=f"evaluate through a deployment instead of weight noise: a preset "
                             f"({', '.join(PRESETS)}), a YAML list of steps, or 'trained': the "
                             f"deployment the checkpoints were trained for")
    parser.add_argument("--sweep", help="with --deployment: kind.field=v1,v2,... (e.g. "
                                        "quantize.bits=2,3,4,8 or stuck_at.p=0,0.01,0.05)")
    parser.add_argument("--device-draws", default="5",
                        help="with --deployment: chips (fault draws) per value (default 5)")
    parser.add_argument("--inference-draws", default="10",
                        help="with --deployment: read-noise runs per chip (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _int_option(flag: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be an integer >= {low}, got {text!r}") from None
    if value < low:
        raise UsageError(f"{flag} must be an integer >= {low}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``robusttrain robustness``: evaluate checkpoints under weight noise (see module docstring).

    Args:
        argv: the arguments after ``robustness``; default ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on bad input (after printing one line to stderr).
    """
    try:
        args = _build_parser().parse_args(argv)
        return _run(args)
    except ValueError as err:  # bad options, CheckpointError, DatasetError are ValueErrors
        message = " ".join(str(err).split("\n")[0].split())
        print(f"robusttrain robustness: error: {message}", file=sys.stderr)
        return 2


def _trained_deployment(paths: list[str]) -> Deployment:
    """``--deployment trained``: the one deployment every checkpoint was trained for."""
    found = []
    for path in paths:
        steps = load_checkpoint(path, option="--ckpt").meta.get("deployment")
        if not steps:
            raise UsageError(f"--deployment trained: {path} was not trained for a deployment; "
                              "name one (a preset or a YAML file)")
        found.append(steps)
    if any(steps != found[0] for steps in found[1:]):
        raise UsageError("--deployment trained: the checkpoints were trained for different "
                          "deployments; evaluate them through one named deployment")
    return Deployment(parse_deployment(found[0]).steps, "trained")


def checkpoints_and_data(
    paths: list[str], data_dir: str | None
) -> tuple[list[LoadedCheckpoint], ImageDataModule]:
    """The checkpoints at ``paths`` and a data module with their (shared) data settings.

    ``data_dir`` replaces the folder the checkpoints were trained with. The data module is not
    set up yet.

    Raises:
        UsageError: a checkpoint without data settings, or checkpoints of different datasets.
    """
    loaded = [load_checkpoint(p, option="--ckpt") for p in paths]
    data = {k: v for k, v in loaded[0].data.items() if not k.startswith("_")}
    if "dataset" not in data:
        raise UsageError(f"{paths[0]} holds no data settings (no 'dataset' in "
                         "datamodule_hyper_parameters); use a checkpoint written by "
                         "`robusttrain fit`")
    for other, path in zip(loaded[1:], paths[1:]):
        if other.data.get("dataset") != data["dataset"]:
            raise UsageError(f"{path} was trained on {other.data.get('dataset')}, "
                              f"{paths[0]} on {data['dataset']}; compare like with like")
    if data_dir:
        data["data_dir"] = data_dir
    try:
        datamodule = ImageDataModule(**data)
    except TypeError as err:  # a data setting this version does not know
        raise UsageError(f"{paths[0]}: its data settings do not fit ImageDataModule "
                          f"({err})") from None
    return loaded, datamodule


def _run(args: argparse.Namespace) -> int:
    levels = _parse_levels(args.levels)
    if args.noise not in NOISE_MODELS:
        raise UsageError(f"unknown noise model {args.noise!r}; choose one of "
                          f"{', '.join(NOISE_MODELS)}")
    draws = _int_option("--draws", args.draws, 1)
    seed = _int_option("--seed", args.seed, 0)
    batch_size = _int_option("--batch-size", args.batch_size, 1)
    bn_batches = _int_option("--bn-batches", args.bn_batches, 1)
    deployment = sweep = None
    device_draws = _int_option("--device-draws", args.device_draws, 1)
    inference_draws = _int_option("--inference-draws", args.inference_draws, 1)
    if args.deployment is not None:
        deployment = (_trained_deployment(args.ckpt) if args.deployment == "trained"
                      else parse_deployment(args.deployment))
        if args.sweep is not None:
            sweep = parse_sweep(args.sweep)
            for value in sweep[2]:  # every swept value must make a valid deployment
                deployment.replace(sweep[0], sweep[1], value)
    elif args.sweep is not None:
        raise UsageError("--sweep needs --deployment (it sweeps a field of a deployment step)")
    if args.name and len(args.name) != len(args.ckpt):
        raise UsageError(f"{len(args.name)} --name for {len(args.ckpt)} --ckpt; give one each")
    names = args.name or [_default_name(p) for p in args.ckpt]
    if len(set(names)) != len(names):
        raise UsageError(f"two checkpoints have the same name {names}; label them with --name")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:k], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda given but no CUDA device is available; use --device cpu")

    loaded, datamodule = checkpoints_and_data(args.ckpt, args.data_dir)
    datamodule.setup("fit" if args.split == "val" or args.bn_mode == "reestimate" else "test")
    if args.split == "val":
        if len(datamodule.val_y) == 0:
            raise UsageError("--split val but the checkpoint's data settings have val_size 0; "
                              "use --split test")
        x, y = datamodule.val_x, datamodule.val_y
    else:
        x, y = datamodule.test_x, datamodule.test_y
    models = {n: c.backbone.to(device) for n, c in zip(names, loaded)}
    if deployment is not None:
        deployed = evaluate_deployment(
            models, x.to(device), y.to(device), deployment, sweep=sweep,
            device_draws=device_draws, inference_draws=inference_draws, seed=seed,
            batch_size=batch_size, progress=not args.no_progress,
        )
        paths = write_deployment_report(deployed, args.out)
        print(f"deployment {deployment.name}: {deployment.describe()}; {args.split} split "
              f"({len(y)} examples); accuracy in %, mean ± std over the draws")
        print(format_deployment_table(deployed))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    result = evaluate_models(
        models, x.to(device), y.to(device), noise=args.noise, levels=levels, draws=draws,
        seed=seed, batch_size=batch_size, bn_mode=args.bn_mode,
        bn_data=datamodule.train_x if args.bn_mode == "reestimate" else None,
        bn_batches=bn_batches, include_bias=args.include_bias, include_norm=args.include_norm,
        progress=not args.no_progress,
    )
    paths = write_report(result, args.out)
    bn_note = {"keep": "kept from training", "reestimate": "re-estimated after each draw"}
    print(f"{args.noise} weight noise, {draws} draws per level, {args.split} split "
          f"({len(y)} examples), BatchNorm statistics {bn_note[args.bn_mode]}; accuracy in %")
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _default_name(path: str) -> str:
    """``runs/<name>/version_k/checkpoints/last.ckpt`` -> ``<name>/version_k``; else the stem."""
    parts = Path(path).parts
    if len(parts) >= 4 and parts[-2] == "checkpoints":
        return f"{parts[-4]}/{parts[-3]}"
    return Path(path).stem

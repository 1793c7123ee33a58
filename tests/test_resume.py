"""Exact resume: a real run killed with SIGKILL in the middle of an epoch, resumed from its last.ckpt,
ends in the state of the run that was never interrupted — parameters, optimizer and scheduler,
counters and logged metrics — for a backprop and a zeroth-order method.

Every child is a real ``robusttrain fit`` process. The settings make each source of state matter:
dropout and crop/flip augmentation (the global RNG and the augmentation generator), a shuffled
sampler whose position is mid-epoch, a mid-epoch validation, momentum, a cosine schedule, the
zeroth-order seeds and forward-pass counter, and the running training accuracy of the epoch.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import _idx

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent

# 2 epochs of 10 batches; validation after batches 5 and 10; last.ckpt every 3 steps.
# The kill comes before step 18, so the newest last.ckpt is the one of step 15 (epoch 1,
# batch 5, after that validation): a mid-epoch checkpoint.
KILL_AT, RESUMED_FROM, FINAL = 17, 15, 20

METHODS = {
    "backprop": {
        "class_path": "robusttrain.training.Classifier",
        "init_args": {
            "seed": 5,
            "optimizer": {"class_path": "torch.optim.SGD",
                          "init_args": {"lr": 0.01, "momentum": 0.9, "nesterov": True}},
        },
    },
    "zeroth_order": {
        "class_path": "robusttrain.training.ZerothOrderClassifier",
        "init_args": {
            "seed": 5, "num_pairs": 4, "noise": "relative", "level": 0.05,
            # lr 0.01 diverged (train/loss 291 by step 15, stopped by the divergence guard)
            "optimizer": {"class_path": "torch.optim.SGD",
                          "init_args": {"lr": 0.001, "momentum": 0.9}},
        },
    },
    # IBM's HWA training (the analog extra): noise drawn by aihwkit-lightning, clipping after steps
    "hwa": {
        "class_path": "robusttrain.training.HardwareAwareClassifier",
        "init_args": {
            "seed": 5, "level": 0.05, "clip_sigma": 2.5,
            "optimizer": {"class_path": "torch.optim.SGD",
                          "init_args": {"lr": 0.01, "momentum": 0.9}},
        },
    },
}
HAVE_ANALOG = importlib.util.find_spec("aihwkit_lightning") is not None


def _write_data(folder: Path) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir()
    for prefix, n in [("train", 104), ("t10k", 16)]:
        images = rng.integers(0, 256, (n, 28, 28))
        labels = rng.integers(0, 10, n)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))


def _config(tmp_path: Path, method: str) -> Path:
    model = {"class_path": METHODS[method]["class_path"],
             "init_args": dict(METHODS[method]["init_args"])}
    model["init_args"]["backbone"] = {
        "class_path": "robusttrain.models.MLP",
        "init_args": {"in_features": 784, "hidden": [16], "num_classes": 10, "dropout": 0.3},
    }
    model["init_args"]["scheduler"] = {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                       "init_args": {"T_max": 2}}
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 10, "val_check_interval": 0.5,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "run"}},
        },
        "checkpoint": {"last_every_n_steps": 3},
        "model": model,
        "data": {"class_path": "robusttrain.data.MNISTDataModule",
                 "init_args": {"data_dir": str(tmp_path / "data"), "batch_size": 8,
                               "val_size": 16, "augment": True}},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(tmp_path: Path, config: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "robusttrain", "fit", "--config", str(config),
               "--trainer.logger.init_args.name", name, *extra]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _checkpoint(tmp_path: Path, name: str, version: int) -> dict:
    path = tmp_path / "runs" / name / f"version_{version}" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)


def _epoch_metrics(tmp_path: Path, name: str, version: int) -> dict[str, str]:
    """The per-epoch training accuracy and every validation, from the run's metrics.csv."""
    rows = csv.DictReader(open(tmp_path / "runs" / name / f"version_{version}" / "metrics.csv"))
    found = {}
    for row in rows:
        for key in ("train/acc", "val/acc", "val/loss"):
            if row.get(key):
                found[f"{key}@{row['step']}"] = row[key]
    return found


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.skipif(
        m == "hwa" and not HAVE_ANALOG,
        reason="hwa needs the analog extra: pip install 'robusttrain[analog]'"))
    for m in sorted(METHODS)])
def test_run_killed_mid_epoch_resumes_exactly(tmp_path, method):
    _write_data(tmp_path / "data")
    config = _config(tmp_path, method)

    full = _fit(tmp_path, config, "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _fit(tmp_path, config, "killed", "--trainer.callbacks+=resume_killer.KillAtStep",
                  f"--trainer.callbacks.step={KILL_AT}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    interrupted = _checkpoint(tmp_path, "killed", 0)
    assert interrupted["global_step"] == RESUMED_FROM
    assert interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": RESUMED_FROM - 10}], "the checkpoint is not in the middle of epoch 1"

    last = tmp_path / "runs" / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _fit(tmp_path, config, "killed", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning for a replayed epoch

    want, got = _checkpoint(tmp_path, "full", 0), _checkpoint(tmp_path, "killed", 1)
    assert want["global_step"] == got["global_step"] == FINAL
    for name, value in interrupted["state_dict"].items():  # the resumed steps did train
        assert not torch.equal(value, got["state_dict"][name]), f"{name} did not change"
    _assert_same_tensors(want["state_dict"], got["state_dict"], "state_dict")
    _assert_same_tensors(want["optimizer_states"], got["optimizer_states"], "optimizer")
    _assert_same_tensors(want["lr_schedulers"], got["lr_schedulers"], "scheduler")
    _assert_same_tensors(want["robusttrain"], got["robusttrain"], "robusttrain")
    # what the resumed run logged (epoch 1 from step 15 on) is what the full run logged there
    full_metrics = _epoch_metrics(tmp_path, "full", 0)
    resumed_metrics = _epoch_metrics(tmp_path, "killed", 1)
    assert resumed_metrics, "the resumed run logged nothing"
    for key, value in resumed_metrics.items():
        assert full_metrics.get(key) == value, (
            f"{key}: {value} after resuming, {full_metrics.get(key)} without")
    assert "train/acc@19" in resumed_metrics  # the epoch's accuracy, over all its 10 batches

"""A diverging run stops with one line naming the step, the value and the fix; a healthy one runs on.

In-process runs on the blob problem for each check of :class:`DivergenceGuard` and each kind of
trainer, and one real ``robusttrain fit`` that diverges, stops with exit code 2 and leaves the
checkpoint of the step before.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robusttrain.training import (
    Classifier,
    DivergenceError,
    DivergenceGuard,
    NoiseInjectionClassifier,
    ZerothOrderClassifier,
)
from tests.blob_problem import loaders, sgd, trainer

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path, model, guard, epochs=1):
    train, val = loaders()
    run = trainer(tmp_path, max_epochs=epochs, callbacks=[guard], enable_checkpointing=False)
    run.fit(model, train, val)
    return run


def _zo(lr, **kwargs):
    return ZerothOrderClassifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=lr),
                                 num_pairs=4, **kwargs)


@pytest.mark.parametrize("make", [
    lambda: Classifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=0.1)),
    lambda: _zo(0.01),
    lambda: NoiseInjectionClassifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=0.1)),
], ids=["backprop", "zeroth_order", "noise_injection"])
def test_healthy_runs_are_not_stopped(tmp_path, make):
    guard = DivergenceGuard()
    _fit(tmp_path, make(), guard, epochs=3)
    assert guard.start_loss is not None and guard.start_weight > 0


def test_weights_that_blow_up_stop_a_zeroth_order_run(tmp_path):
    # lr 1e5 on a linear model: the weights grow by orders of magnitude per step, the loss too
    guard = DivergenceGuard(loss_factor=None)
    with pytest.raises(DivergenceError) as info:
        _fit(tmp_path, _zo(1e5), guard)
    message = str(info.value)
    assert message.startswith("training diverged at step ")
    assert "max |weight|" in message and "× its start" in message
    assert "lower the learning rate, lower sigma (or level)" in message
    assert "centered_ranks" in message and "--divergence." in message
    step = int(message.split("at step ")[1].split(":")[0])
    value = float(message.split("max |weight| ")[1].split(" ")[0])
    assert value > 1000 * guard.start_weight and step >= 1


def test_a_loss_that_blows_up_stops_a_backprop_run(tmp_path):
    guard = DivergenceGuard(loss_factor=10, weight_factor=None)
    # logits scaled by a growing factor: the loss grows without bound and stays finite
    model = Classifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=50.0))
    with pytest.raises(DivergenceError) as info:
        _fit(tmp_path, model, guard, epochs=5)
    message = str(info.value)
    assert "train/loss" in message and "(max of its first value and ln C)" in message
    value = float(message.split("train/loss ")[1].split(" ")[0])
    scale = max(guard.start_loss, math.log(3))
    assert math.isfinite(value) and value > 10 * scale
    assert "sigma" not in message  # the backprop advice names only the learning rate


def test_the_loss_check_reads_the_current_steps_loss(tmp_path):
    # the step named is the one whose loss crossed the limit, not the one after it
    seen = []

    class Spy(DivergenceGuard):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(outputs["loss"]), float(trainer.callback_metrics["train/loss"])))
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    model = Classifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=0.1))
    _fit(tmp_path, model, Spy())
    assert len(seen) == 6 and all(a == pytest.approx(b) for a, b in seen)


def test_a_non_finite_weight_is_reported(tmp_path):
    guard = DivergenceGuard()
    model = Classifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=0.1))
    guard.start_weight = 1.0
    with torch.no_grad():
        model.backbone.weight[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match=r"step 7: a weight is inf"):
        guard._check_weights(float("inf"), 7, trainer(tmp_path), model)


def test_the_references_travel_in_the_checkpoint():
    guard = DivergenceGuard()
    guard.start_loss, guard.start_weight = 2.5, 0.3
    resumed = DivergenceGuard()
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.start_loss, resumed.start_weight) == (2.5, 0.3)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_factor": 1}, "loss_factor must be a number > 1 or null"),
    ({"weight_factor": float("nan")}, "weight_factor must be a number > 1 or null"),
    ({"check_every_n_steps": 0}, "check_every_n_steps must be an integer >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DivergenceGuard(**kwargs)


def test_a_diverging_fit_stops_in_one_line_and_keeps_the_checkpoint_before(tmp_path, tiny_mnist):
    config = {
        "trainer": {"max_epochs": 3, "enable_progress_bar": False, "log_every_n_steps": 1},
        "checkpoint": {"last_every_n_steps": 1},
        "model": {"class_path": "robusttrain.training.ZerothOrderClassifier",
                  "init_args": {
                      "num_pairs": 2,
                      "backbone": {"class_path": "robusttrain.models.MLP",
                                   "init_args": {"in_features": 784, "hidden": [8],
                                                 "num_classes": 10}},
                      "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1}}}},
        "data": {"class_path": "robusttrain.data.MNISTDataModule",
                 "init_args": {"data_dir": str(tiny_mnist), "batch_size": 8, "val_size": 16}},
    }
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "robusttrain", "fit", "--config", str(path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith("robusttrain fit: error: training diverged at step ")
    step = int(errors[0].split("at step ")[1].split(":")[0])
    last = Path("runs") / "default" / "version_0" / "checkpoints" / "last.ckpt"
    assert errors[0].endswith(f"the last checkpoint saved before it is {last}")
    saved = torch.load(tmp_path / last, map_location="cpu", weights_only=False)
    assert step > 1 and saved["global_step"] == step - 1  # the diverged step was never written

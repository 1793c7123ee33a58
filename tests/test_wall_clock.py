"""``time/fit_s`` lands beside ``val/acc`` once per validation epoch and counts on across a resume."""

from __future__ import annotations

import csv
import itertools
import time

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from robusttrain.training import Classifier, WallClock
from robusttrain.training import wall_clock as wall_clock_module
from tests.blob_problem import loaders, sgd, trainer


class _Clock:
    """A perf_counter that advances 1 s per reading, so every interval is known exactly."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self._ticks))


def _fit(tmp_path, epochs, ckpt_path=None, version=0):
    train, val = loaders()
    model = Classifier(torch.nn.Linear(8, 3), num_classes=3, optimizer=sgd(lr=0.1))
    logger = CSVLogger(tmp_path, name="run", version=version)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    run = trainer(tmp_path, max_epochs=epochs, logger=logger, callbacks=[WallClock(), checkpoint])
    run.fit(model, train, val, ckpt_path=ckpt_path)
    with open(tmp_path / "run" / f"version_{version}" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("time/fit_s")]
    return [(int(r["epoch"]), float(r["time/fit_s"]), r["val/acc"]) for r in rows]


def test_one_reading_per_validation_epoch_beside_val_acc(tmp_path):
    start = time.perf_counter()
    rows = _fit(tmp_path, epochs=3)
    took = time.perf_counter() - start
    assert [epoch for epoch, _, _ in rows] == [0, 1, 2]
    seconds = [s for _, s, _ in rows]
    assert all(b > a for a, b in zip(seconds, seconds[1:])), seconds
    assert 0 < seconds[-1] <= took
    assert all(acc for _, _, acc in rows)  # on the row of val/acc, so the two plot together


def test_a_resumed_run_goes_on_from_the_time_in_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(wall_clock_module, "time", _Clock())
    first = _fit(tmp_path, epochs=2)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    carried = next(v["seconds"] for k, v in saved.items() if k.startswith("WallClock"))
    assert carried >= first[-1][1]
    resumed = _fit(tmp_path, epochs=3, ckpt_path=tmp_path / "checkpoints" / "last.ckpt", version=1)
    assert [epoch for epoch, _, _ in resumed] == [2]
    # a fresh count would restart near 0, below the two epochs already spent
    assert resumed[0][1] > carried


def test_state_round_trip():
    clock = WallClock()
    clock.load_state_dict({"seconds": 12.5})
    assert clock.elapsed() == 12.5
    assert WallClock().state_dict() == {"seconds": 0.0}

"""Checkpoints written by earlier versions of robusttrain still load.

``fixtures/checkpoint_v0_1.ckpt`` (6 KB) was written by robusttrain 0.1.0, when the
LightningModules lived in ``robusttrain.module``, by two zeroth-order steps on random data::

    class TinyData(ImageDataModule):  # ImageDataModule's hyperparameters, 16 random 4-d points
        def setup(self, stage=None):
            g = torch.Generator().manual_seed(0)
            self.train_x = torch.randn(16, 4, generator=g)
            self.train_y = (self.train_x[:, 0] > 0).long()
            self.val_x, self.val_y = self.train_x[:0], self.train_y[:0]
            self.test_x, self.test_y = self.train_x, self.train_y
            self._ready = True

    seed_everything(0)
    model = ZerothOrderClassifier(MLP(in_features=4, hidden=[3], num_classes=2), sigma=0.01,
                                  num_pairs=2, seed=0)
    data = TinyData(dataset="fashion_mnist", batch_size=8, val_size=0)
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint("checkpoint_v0_1.ckpt")

so it holds what a ``robusttrain fit`` checkpoint holds: the ``robusttrain`` entry (format,
method, backbone class path and arguments), the ``state_dict`` and the
``datamodule_hyper_parameters``. The expected logits below were printed by 0.1.0's
``load_checkpoint(...).backbone`` on the inputs ``X``.
"""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from robusttrain.models import MLP
from robusttrain.training import (
    BestAndLastCheckpoint,
    CheckpointError,
    Classifier,
    load_checkpoint,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v0_1.ckpt"

X = torch.tensor([[-1.5, -0.75, -0.65, -1.6], [-0.1, -0.6, -1.0, -1.6],
                  [-0.7, 0.3, -0.8, -0.25], [-0.2, 1.7, 0.2, 0.5]])
LOGITS_V0_1 = torch.tensor([[0.4744114279747009, -0.1736978143453598],
                            [0.4793950915336609, -0.23335449397563934],
                            [0.47188496589660645, -0.12565167248249054],
                            [0.4912247657775879, -0.14626087248325348]])


def test_checkpoint_of_version_0_1_loads_with_its_weights_and_outputs():
    loaded = load_checkpoint(FIXTURE)
    assert loaded.meta["format"] == 1 and loaded.meta["method"] == "zeroth_order"
    assert loaded.meta["backbone"] == {
        "class_path": "robusttrain.models.MLP",
        "init_args": {"in_features": 4, "hidden": [3], "num_classes": 2, "dropout": 0.0},
    }
    assert loaded.meta["sigma"] == 0.01 and loaded.meta["num_pairs"] == 2
    assert loaded.data["dataset"] == "fashion_mnist" and loaded.data["batch_size"] == 8
    assert not loaded.backbone.training
    saved = torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]
    state = loaded.backbone.state_dict()
    assert {f"backbone.{k}" for k in state} == set(saved)
    for name, value in state.items():
        assert torch.equal(value, saved[f"backbone.{name}"]), name
    with torch.no_grad():
        logits = loaded.backbone(X)
    assert torch.allclose(logits, LOGITS_V0_1, rtol=0, atol=1e-6)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is a text file, not a checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a robusttrain checkpoint"):
        load_checkpoint(foreign)
    evil = tmp_path / "evil.ckpt"
    torch.save({"robusttrain": {"format": 1, "backbone": {"class_path": "os.system"}}}, evil)
    with pytest.raises(CheckpointError, match="not a robusttrain model"):
        load_checkpoint(evil)
    wrong = tmp_path / "wrong.ckpt"
    spec = MLP(8, [16], 3).spec
    torch.save({"robusttrain": {"format": 1, "backbone": spec}, "state_dict": {}}, wrong)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(wrong)


# --- last.ckpt is the final state, best.ckpt the best epoch --------------------------------------


class _FallingAccuracy(Classifier):
    """Logs a validation accuracy that falls every epoch, so the best epoch is the first."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 - 0.1 * self.current_epoch)


def _fit_with(callback, tmp_path, epochs=3, val_check_interval=1.0):
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = _FallingAccuracy(MLP(4, [3], 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = Trainer(max_epochs=epochs, logger=False, callbacks=[callback],
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0,
                      val_check_interval=val_check_interval)
    trainer.fit(model, loader, loader)
    return trainer, model


def _step_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_lightnings_own_save_last_keeps_a_stale_last_ckpt(tmp_path):
    # the behaviour BestAndLastCheckpoint works around (Lightning 2.6): if this starts failing,
    # Lightning writes last.ckpt at the end by itself and the subclass may be simplified
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True,
                               filename="best")
    trainer, _ = _fit_with(callback, tmp_path)
    assert _step_of(tmp_path / "last.ckpt") == 4 < trainer.global_step == 12


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])  # once an epoch, and mid-epoch too
def test_last_ckpt_holds_the_final_state_and_best_ckpt_the_best_epoch(tmp_path, val_check_interval):
    callback = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max",
                                     save_last=True, filename="best")
    trainer, model = _fit_with(callback, tmp_path, val_check_interval=val_check_interval)
    # the best is the first validation: after 4 steps (an epoch of 4 batches of 8), or 2
    assert _step_of(tmp_path / "best.ckpt") == int(4 * val_check_interval)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == trainer.global_step == 12
    for name, value in model.state_dict().items():
        assert torch.equal(last["state_dict"][name], value), name
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


class _RisingAccuracy(Classifier):
    """Logs a validation accuracy that rises every validation, so every validation is the best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", float(self.global_step))


class _Recording(BestAndLastCheckpoint):
    """Records which file each save wrote, and at which step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves = []

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        self.saves.append((Path(filepath).name, trainer.global_step))


def test_last_every_n_steps_saves_mid_epoch_and_keeps_the_best(tmp_path):
    callback = _Recording(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True,
                          filename="best", last_every_n_steps=3)
    torch.manual_seed(0)
    x, y = torch.randn(48, 4), torch.randint(0, 2, (48,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 6 batches an epoch
    model = _RisingAccuracy(MLP(4, [3], 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = Trainer(max_epochs=2, logger=False, callbacks=[callback], enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0, val_check_interval=0.5)  # validate at 3 and 6
    trainer.fit(model, loader, loader)
    best_steps = [step for name, step in callback.saves if name == "best.ckpt"]
    last_steps = [step for name, step in callback.saves if name == "last.ckpt"]
    # every validation (steps 3, 6, 9, 12) improves: each writes best.ckpt, also at step 3 and 9
    # where the step-based last.ckpt was written just before it
    assert best_steps == [3, 6, 9, 12]
    # last.ckpt: before and after the validations of steps 3 and 9, after those of 6 and 12
    # (the end of an epoch is left to the epoch's own save point), never twice for one state
    assert last_steps == [3, 3, 6, 9, 9, 12]
    assert _step_of(tmp_path / "last.ckpt") == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"last_every_n_steps": -1}, "last_every_n_steps must be an integer >= 0"),
    ({"last_every_n_steps": 2.5}, "last_every_n_steps must be an integer >= 0"),
    ({"last_every_n_steps": 2, "save_last": False}, "needs save_last=True"),
])
def test_last_every_n_steps_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BestAndLastCheckpoint(**{"save_last": True, **kwargs})

"""Zeroth-order training across processes: every process ends with the same weights, in the
data-parallel and the population-parallel mode, and a multi-process run resumes exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from robusttrain.data import MNISTDataModule
from robusttrain.models import MLP
from robusttrain.training import BestAndLastCheckpoint, ZerothOrderClassifier
from tests.conftest import _idx


class AssertRanksAgree(Callback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2
        # each process saw a different half of every batch; without averaging the estimates
        # their weights would drift apart after the first step
        assert torch.equal(gathered[0], gathered[1])


def _sgd(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True)


@pytest.mark.slow
def test_two_process_zeroth_order_training_stays_in_sync(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = ZerothOrderClassifier(MLP(8, [8], 2), optimizer=_sgd, sigma=0.01, num_pairs=4)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AssertRanksAgree()], default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    assert trainer.state.finished


# ----- population-parallel training: 1, 2 and 3 processes end in the same place ------------------


class OneThread(Callback):
    """Every process computes with one thread (the same kernels in every process)."""

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)


class Drift(Callback):
    """Moves one weight of process 1 after step 2: the sync check must catch it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] += 1e-3


class Crash(Callback):
    """Every process raises before optimizer step ``step + 1``, as a crashed job would stop."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _tiny_mnist(folder: Path) -> str:
    if not folder.exists():
        folder.mkdir()
        rng = np.random.default_rng(2)
        for prefix, n in [("train", 104), ("t10k", 16)]:
            (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
                _idx(rng.integers(0, 256, (n, 28, 28))))
            (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    return str(folder)


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.001, momentum=0.9)


def _zo_fit(tmp_path, processes, *, parallel="population", perturbation="gaussian",
            population=False, max_steps=-1, ckpt_path=None, callbacks=(), sync_check_every=0,
            use_distributed_sampler=None, name="run"):
    """2 epochs of 11 steps (88 images, batch 8) of a 5-pair ZO MLP on `processes` CPU processes."""
    data = MNISTDataModule(data_dir=_tiny_mnist(tmp_path / "data"), batch_size=8, val_size=16)
    torch.manual_seed(0)
    model = ZerothOrderClassifier(
        MLP(784, [16], 10), optimizer=_sgd_momentum, num_pairs=5, seed=7, noise="relative",
        level=0.05, perturbation=perturbation, population=population, parallel=parallel,
        sync_check_every=sync_check_every)
    if use_distributed_sampler is None:
        use_distributed_sampler = parallel == "data"
    trainer = Trainer(
        accelerator="cpu", devices=processes, max_epochs=2, max_steps=max_steps,
        strategy="ddp_spawn" if processes > 1 else "auto", logger=False,
        use_distributed_sampler=use_distributed_sampler, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / name,
        callbacks=[OneThread(), *callbacks],
        enable_checkpointing=any(isinstance(c, BestAndLastCheckpoint) for c in callbacks),
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


def _params(model):
    return [p.detach().clone() for p in model.backbone.parameters()]


@pytest.mark.slow
def test_population_parallel_run_is_the_same_on_1_2_and_3_processes(tmp_path):
    # the in-place loop: every loss is one ordinary forward pass → bit for bit, also with the
    # uneven shares of 5 pairs over 2 (3 + 2) and 3 (2 + 2 + 1) processes
    trainer, one = _zo_fit(tmp_path, 1)
    assert trainer.global_step == 22
    for processes in (2, 3):
        # (the weights come back from the spawned rank 0; its trainer's counters do not)
        _, many = _zo_fit(tmp_path, processes, sync_check_every=1, name=f"p{processes}")
        for a, b in zip(_params(one), _params(many)):
            assert torch.equal(a, b), f"{processes} processes"
    # and not trivially: the data-parallel mode sums in another order, the seed matters
    _, data_mode = _zo_fit(tmp_path, 1, parallel="data", name="data")
    assert not all(torch.equal(a, b) for a, b in zip(_params(one), _params(data_mode)))


@pytest.mark.slow
def test_population_parallel_engine_matches_one_process_to_float_rounding(tmp_path):
    # the batched engine evaluates 3 + 2 members in one GEMM instead of 5: the same sums in
    # another blocking, so float32 rounding (~1e-7 relative per loss) is all that may differ
    _, one = _zo_fit(tmp_path, 1, perturbation="lowrank", population=True)
    _, two = _zo_fit(tmp_path, 2, perturbation="lowrank", population=True, name="p2")
    for a, b in zip(_params(one), _params(two)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["population", "data"])
def test_two_process_run_resumes_mid_epoch(tmp_path, parallel):
    _, full = _zo_fit(tmp_path, 2, parallel=parallel, name="full")
    # last.ckpt every 4 steps; the processes crash before step 10, so the newest last.ckpt is the
    # one of step 8: in the middle of an epoch of 11 batches (population: every process reads
    # them all) or of 6 (data: each process reads half of them)
    saver = BestAndLastCheckpoint(dirpath=tmp_path / "first", filename="best", save_last=True,
                                  last_every_n_steps=4)
    with pytest.raises(Exception, match="crash at step 9"):
        _zo_fit(tmp_path, 2, parallel=parallel, callbacks=[saver, Crash(9)], name="first")
    last = tmp_path / "first" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 8
    batches = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"]
    assert batches == (8 if parallel == "population" else 2)
    _, resumed = _zo_fit(tmp_path, 2, parallel=parallel, ckpt_path=str(last), name="resumed")
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sync_check_stops_processes_that_drift_apart(tmp_path):
    with pytest.raises(Exception, match="different parameters at step 2"):
        _zo_fit(tmp_path, 2, sync_check_every=1, callbacks=[Drift()])


@pytest.mark.slow
def test_population_mode_refuses_sharded_batches(tmp_path):
    with pytest.raises(Exception, match="use_distributed_sampler=False"):
        _zo_fit(tmp_path, 2, use_distributed_sampler=True)

"""Checkpoints are written whole: a kill or a full disk during the write leaves the previous one.

Pinned first: what Lightning's own writer does (a temporary file in the system temp folder, moved
into place, nothing fsynced), which is why robusttrain replaces it. Then the replacement in unit
tests, and with real ``robusttrain fit`` processes killed (SIGKILL) or starved of disk in the middle
of writing ``last.ckpt``.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from fsspec.implementations import local as fsspec_local
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from robusttrain import files
from robusttrain.training import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    CheckpointWriteError,
    Classifier,
)
from tests.blob_problem import loaders
from tests.test_resume import (
    FINAL,
    _assert_same_tensors,
    _checkpoint,
    _config,
    _fit,
    _write_data,
)

WHOLE_STEP = 12  # the newest whole last.ckpt when the write of step 15's is cut (every 3 steps)
CUT_STEP = 15


def test_lightnings_own_writer_moves_a_temp_file_from_the_system_temp_folder(tmp_path, monkeypatch):
    # what robusttrain does not rely on: if Lightning starts writing beside the destination and
    # fsyncing, AtomicCheckpointIO's reason to exist (and its docstring) must be revisited
    moves, syncs = [], []
    real_move = fsspec_local.shutil.move
    monkeypatch.setattr(fsspec_local.shutil, "move",
                        lambda src, dst: (moves.append((src, dst)), real_move(src, dst))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    TorchCheckpointIO().save_checkpoint({"x": torch.ones(3)}, tmp_path / "last.ckpt")
    assert len(moves) == 1
    source = Path(moves[0][0])
    assert source.parent == Path(tempfile.gettempdir()) and source.parent != tmp_path
    assert syncs == []


def test_atomic_io_writes_beside_the_destination_and_fsyncs(tmp_path, monkeypatch):
    replaced, syncs = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(files.os, "replace",
                        lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst))[1])
    monkeypatch.setattr(files.os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    AtomicCheckpointIO().save_checkpoint({"x": torch.arange(4)}, tmp_path / "last.ckpt")
    assert [Path(src).parent for src, _ in replaced] == [tmp_path]
    assert len(syncs) == 2  # the file, then the folder that holds its new name
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["x"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_write_keeps_the_old_file_and_says_so(tmp_path, monkeypatch, existed):
    path = tmp_path / "last.ckpt"
    if existed:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    before = path.read_bytes() if existed else None

    def disk_full(obj, f):
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    message = str(info.value)
    assert str(path) in message
    if existed:
        assert "previous last.ckpt is intact" in message and f"--ckpt_path {path}" in message
        assert path.read_bytes() == before
    else:
        assert "no last.ckpt was written" in message and not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["last.ckpt"] if existed else [])


def test_the_checkpoint_callback_installs_the_atomic_writer(tmp_path):
    train, val = loaders()
    model = Classifier(torch.nn.Linear(8, 3), num_classes=3)
    callback = BestAndLastCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc",
                                     mode="max", save_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train, val)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_a_run_killed_inside_the_checkpoint_write_resumes_from_the_last_whole_one(tmp_path):
    _write_data(tmp_path / "data")
    config = _config(tmp_path, "backprop")
    full = _fit(tmp_path, config, "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _fit(tmp_path, config, "killed",
                  "--trainer.callbacks+=resume_killer.KillInCheckpointWrite",
                  f"--trainer.callbacks.step={CUT_STEP}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = tmp_path / "runs" / "killed" / "version_0" / "checkpoints"
    # the kill came mid-write: half a checkpoint sits in a temporary file, last.ckpt is whole
    partial = list(folder.glob(".last.ckpt.*.part"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - any loader error: the half file is not usable
        torch.load(partial[0], map_location="cpu", weights_only=False)
    assert _checkpoint(tmp_path, "killed", 0)["global_step"] == WHOLE_STEP

    resumed = _fit(tmp_path, config, "killed", "--ckpt_path", str(folder / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _checkpoint(tmp_path, "full", 0), _checkpoint(tmp_path, "killed", 1)
    assert want["global_step"] == got["global_step"] == FINAL
    _assert_same_tensors(want["state_dict"], got["state_dict"], "state_dict")
    _assert_same_tensors(want["optimizer_states"], got["optimizer_states"], "optimizer")


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_old_checkpoint(tmp_path):
    _write_data(tmp_path / "data")
    config = _config(tmp_path, "zeroth_order")
    failed = _fit(tmp_path, config, "full_disk",
                  "--trainer.callbacks+=resume_killer.FailCheckpointWrite",
                  f"--trainer.callbacks.step={CUT_STEP}")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    folder = tmp_path / "runs" / "full_disk" / "version_0" / "checkpoints"
    assert errors == [
        f"robusttrain fit: error: could not write checkpoint {folder / 'last.ckpt'}: No space "
        f"left on device (the previous last.ckpt is intact; free space or fix the folder's "
        f"permissions, then resume with --ckpt_path {folder / 'last.ckpt'})"
    ]
    assert _checkpoint(tmp_path, "full_disk", 0)["global_step"] == WHOLE_STEP
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]

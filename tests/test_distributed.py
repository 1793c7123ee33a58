"""Zeroth-order training across processes: every process ends with the same weights."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from robusttrain.models import MLP
from robusttrain.training import ZerothOrderClassifier


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

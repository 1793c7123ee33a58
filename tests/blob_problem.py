"""A small synthetic problem for the LightningModule tests: Gaussian blobs, their loaders, a quiet
CPU trainer and an SGD factory (imported by the test modules; not a test module itself)."""

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset


def blobs(n=512, dim=8, classes=3, seed=0):
    """Gaussian blobs that a linear model separates almost perfectly."""
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def loaders(batch_size=64):
    """384 training blobs (in order) and 128 validation blobs."""
    x, y = blobs()
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)
    return train, val


def trainer(tmp_path, **kwargs):
    """A CPU Trainer without logger, progress bar or model summary; ``kwargs`` override."""
    defaults = dict(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", max_epochs=1,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def sgd(lr=0.1, **kw):
    """An optimizer factory of the kind LightningCLI passes to the modules."""
    return lambda params: torch.optim.SGD(params, lr=lr, **kw)

"""Real training on Fashion-MNIST: the backprop baseline and the zeroth-order method learn."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from robusttrain.data import FashionMNISTDataModule
from robusttrain.models import MLP
from robusttrain.training import Classifier, NoiseInjectionClassifier, ZerothOrderClassifier


def _fit(model, datamodule, tmp_path, **trainer_kwargs):
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=datamodule)
    return float(trainer.callback_metrics["val/acc"])


@pytest.fixture
def fashion(fashion_dir):
    return FashionMNISTDataModule(data_dir=str(fashion_dir), batch_size=128)


@pytest.mark.slow
def test_sgd_reaches_80_percent_in_one_epoch(fashion, tmp_path):
    seed_everything(0)
    model = Classifier(
        MLP(784, [128], 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    )
    assert _fit(model, fashion, tmp_path, max_epochs=1) >= 0.80


@pytest.mark.slow
def test_zeroth_order_reaches_70_percent_quickly(fashion, tmp_path):
    # 600 steps of the antithetic estimator (N = 16, 32 perturbed forwards each): forward passes
    # only, no autograd through the network
    seed_everything(0)
    model = ZerothOrderClassifier(
        MLP(784, [128], 10),
        optimizer=lambda p: torch.optim.SGD(p, lr=3e-4, momentum=0.9, nesterov=True),
        sigma=0.01, num_pairs=16, seed=0,
    )
    acc = _fit(model, fashion, tmp_path, max_epochs=2, limit_train_batches=300)
    assert acc >= 0.70
    assert model._forward_passes == 600 * 33


@pytest.mark.slow
def test_noise_injection_learns(fashion, tmp_path):
    seed_everything(0)
    model = NoiseInjectionClassifier(
        MLP(784, [128], 10), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        sigma=0.05,
    )
    assert _fit(model, fashion, tmp_path, max_epochs=1, limit_train_batches=200) >= 0.75

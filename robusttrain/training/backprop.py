"""Backprop training: :class:`Classifier`, the baseline and the base of every trainer.

:class:`Classifier` holds what every training method shares — the backbone, the metrics, validation,
test and prediction (through a deployment when the run has one), the optimizer and scheduler,
exact resume of the running training accuracy, and the ``robusttrain`` entry of every checkpoint
that lets :func:`robusttrain.training.checkpoints.load_checkpoint` rebuild the backbone without
unpickling code. Its own ``training_step`` is ordinary backprop on the loss L(θ); the other trainers
(:mod:`~robusttrain.training.zeroth_order`, :mod:`~robusttrain.training.noise_injection`,
:mod:`~robusttrain.training.quantization_aware`) override it.

Every trainer logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and
``test/acc`` (and ``val/float_acc``, ``test/float_acc`` with a deployment).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from robusttrain.noise.deployment import Deployment, deployed, parse_deployment
from robusttrain.training.base import (
    EVAL_CHIP,
    batch_seed,
    deployment_seeds,
    destroy_process_group_at_exit,
    load_backbone_weights,
)
from robusttrain.training.checkpoints import CHECKPOINT_FORMAT
from robusttrain.zo.coefficients import NonFiniteLossError

__all__ = ["Classifier"]


class Classifier(LightningModule):
    """Image classifier trained by backprop; the base of every robusttrain training method.

    Args:
        backbone: any ``nn.Module`` mapping images to logits (see :mod:`robusttrain.models`).
        optimizer: a ``torch.optim`` optimizer factory (LightningCLI fills it from the config's
            ``optimizer:`` block). ``None`` means SGD with lr 0.05 and momentum 0.9.
        scheduler: an optional learning-rate scheduler factory, stepped once per epoch.
        num_classes: number of classes; ``None`` takes ``backbone.spec["init_args"]["num_classes"]``.
        seed: base seed of the run's training randomness. Before every training batch the global
            torch RNG is reseeded from (seed, epoch, batch index, process rank), so dropout (and
            anything else in ``training_step`` that draws from it) is a function of the batch's
            place in the run: a run resumed from any checkpoint, also one taken in the middle of
            an epoch, draws what the uninterrupted run drew.
        deployment: the hardware the model is trained for (a preset name, a YAML file or a list
            of steps; see :mod:`robusttrain.noise.deployment`). Validation and test then run the
            model through it — ``val/acc``, ``val/loss`` are the deployed model's, on one chip
            per run (faults drawn once from ``seed``) with fresh read noise per batch — and
            ``val/float_acc`` is the accuracy of the float weights; ``best.ckpt`` is chosen by
            the deployed accuracy. Plain backprop with a deployment is train-then-quantize
            (post-training quantization); :class:`QuantizationAwareClassifier` and
            :class:`ZerothOrderClassifier` also train through it.
        init_from: a robusttrain checkpoint whose backbone weights start the run (fine-tuning);
            its backbone must have the same shapes. Resuming with ``--ckpt_path`` replaces them
            with the checkpoint's, as always.

    Resuming is exact from any checkpoint: the parameters, optimizer and scheduler states, the
    counters, the data loader's place in the epoch (:class:`robusttrain.data.ResumableDataLoader`),
    the running training accuracy of the interrupted epoch, and every random draw are restored or
    recomputed from the checkpoint (``tests/test_resume.py``).
    """

    method = "backprop"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.deployment: Deployment | None = (
            None if deployment is None else parse_deployment(deployment))
        if init_from is not None:
            load_backbone_weights(backbone, init_from)
        self.init_from = init_from
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if num_classes is None:
            num_classes = getattr(backbone, "spec", {}).get("init_args", {}).get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "cannot tell the number of classes: pass num_classes=<int >= 2> "
                "(backbones from robusttrain.models provide it themselves)"
            )
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_float_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_float_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def setup(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group_at_exit()

    def model_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean forward pass: returns (mean cross-entropy loss, logits, targets)."""
        x, y = batch
        logits = self.backbone(x)
        return F.cross_entropy(logits, y), logits, y

    # ----- training --------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(batch_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:  # None: a trainer that takes its optimizer step itself
        loss, logits, y = self.model_step(batch)
        self._log_train(loss, logits, y)
        return loss

    def _log_train(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.global_step}; lower the "
                "learning rate (or sigma for the smoothed methods) and start again"
            )
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)

    # ----- evaluation (shared by every method) -----------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_loss, self.val_acc, self.val_float_acc, batch_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_loss, self.test_acc, self.test_float_acc,
                        batch_idx)

    def _eval_step(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        split: str,
        loss_metric: MeanMetric,
        acc_metric: MulticlassAccuracy,
        float_acc_metric: MulticlassAccuracy,
        batch_idx: int,
    ) -> None:
        if self.evaluates_deployed:
            _, float_logits, y = self.model_step(batch)
            float_acc_metric(float_logits, y)
            self.log(f"{split}/float_acc", float_acc_metric, on_step=False, on_epoch=True)
        loss, logits, y = self._eval_model_step(batch, batch_idx)
        loss_metric(loss, weight=y.numel())
        acc_metric(logits, y)
        self.log(f"{split}/loss", loss_metric, on_step=False, on_epoch=True)
        self.log(f"{split}/acc", acc_metric, on_step=False, on_epoch=True, prog_bar=True)

    @property
    def evaluates_deployed(self) -> bool:
        """Whether validation and test run the model deployed (then ``*/float_acc`` is logged too)."""
        return self.deployment is not None

    def _eval_model_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`model_step` as validation, test and predict see the model.

        Through the deployment when the run has one: on the evaluation chip (faults drawn from
        (seed, :data:`EVAL_CHIP`), the same for every batch) with read noise drawn per batch from
        that chip and ``batch_idx``, so the same batch draws the same noise in every command.
        """
        if self.deployment is None:
            return self.model_step(batch)
        chip = self.eval_chip_seed()
        _, reads = deployment_seeds(chip, batch_idx)
        with deployed(self.backbone, self.deployment, device_seed=chip, inference_seed=reads):
            return self.model_step(batch)

    def eval_chip_seed(self) -> int:
        """Device seed of the chip that validation, test and predict run the deployment on."""
        return deployment_seeds(self.seed, EVAL_CHIP)[0]

    def predict_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C), labels (B,)) of one batch, through the deployment when there is one.

        The deployment draws what :meth:`test_step` draws for the same batch, so ``robusttrain
        predict`` and ``robusttrain test`` through a deployment see the same deployed model;
        :class:`robusttrain.training.predict.PredictionWriter` writes the rows.
        """
        _, logits, y = self._eval_model_step(batch, batch_idx)
        return logits, y

    # ----- optimizers ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }

    def _step_with_gradient_at(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        moved: list[torch.Tensor],
        move: Any,
        forward_context: contextlib.AbstractContextManager | None = None,
    ) -> torch.Tensor:
        """One optimizer step of θ with the gradient taken at a moved point.

        ``move()`` changes the tensors ``moved`` in place (outside autograd); the forward and
        backward pass run there (inside ``forward_context``), the clean tensors are written back
        bit for bit, also on an error, and the optimizer steps θ with that gradient. Noise
        injection (the moved point is θ + σg) and the straight-through estimator (it is the
        deployed D(θ)) are both this step.
        """
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers gives one optimizer
        clean = [t.detach().clone() for t in moved]
        try:
            with torch.no_grad():
                move()
            with forward_context or contextlib.nullcontext():
                loss, logits, y = self.model_step(batch)
            self._log_train(loss, logits, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
        finally:
            with torch.no_grad():
                for t, c in zip(moved, clean):
                    t.copy_(c)
        optimizer.step()
        return loss.detach()

    def _step_scheduler_manually(self) -> None:
        """Manual optimization does not step schedulers: do it once per epoch, as configured."""
        scheduler = self.lr_schedulers()
        assert not isinstance(scheduler, list)  # configure_optimizers gives at most one
        if scheduler is not None:
            scheduler.step()

    # ----- checkpoints -----------------------------------------------------------------------
    def robusttrain_meta(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild and describe this model (plain data only)."""
        spec = getattr(self.backbone, "spec", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.method,
            "backbone": spec,
            "num_classes": self.num_classes,
            "deployment": None if self.deployment is None else self.deployment.to_list(),
            "init_from": self.init_from,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["robusttrain"] = self.robusttrain_meta()
        checkpoint["robusttrain_train_acc"] = self._train_acc_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._load_train_acc_state(checkpoint.get("robusttrain_train_acc"))

    def _train_acc_state(self) -> dict[str, torch.Tensor]:
        """The running training accuracy of the current epoch, summed over processes.

        Called on every process when a checkpoint is written (Lightning builds the checkpoint on
        all ranks), so the all-reduce of a multi-process run is matched on every rank.
        """
        metric = self.train_acc
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        state = {}
        for name in metric._defaults:
            value = getattr(metric, name)
            if not isinstance(value, torch.Tensor):
                return {}  # list states (not used by this metric) are not carried over
            value = value.detach().clone()
            if distributed:
                torch.distributed.all_reduce(value)
            state[name] = value.cpu()
        return state

    def _load_train_acc_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore :meth:`_train_acc_state` on rank 0 (the other ranks start from zero)."""
        self.train_acc.reset()
        if not state or self.global_rank != 0:
            return
        for name, value in state.items():
            current = getattr(self.train_acc, name, None)
            if isinstance(current, torch.Tensor) and current.shape == value.shape:
                setattr(self.train_acc, name, value.to(current.device, current.dtype))
        self.train_acc._update_count = 1

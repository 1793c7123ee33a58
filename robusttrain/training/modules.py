"""LightningModules: one classifier, four ways to train it.

* :class:`Classifier` — ordinary backprop on the loss L(θ) (the baseline).
* :class:`ZerothOrderClassifier` — minimizes the Gaussian-smoothed loss
  L_σ(θ) = E_g[L(θ + σg)] from forward passes only, with the antithetic estimator of
  :mod:`robusttrain.zo.estimators`; the estimate is written into ``.grad`` and any ``torch.optim``
  optimizer (SGD with momentum or Nesterov, Adam, ...) takes the step.
* :class:`NoiseInjectionClassifier` — backprop on the smoothed loss: each step takes the gradient at
  θ + σg for a fresh g (a one-sample reparameterised estimate of ∇L_σ), then steps from θ.
* :class:`QuantizationAwareClassifier` — backprop through a deployment (quantized, faulty, noisy
  weights) with the straight-through estimator: QAT, and QAT + noise.

Each takes a ``deployment`` (:mod:`robusttrain.noise.deployment`): validation then measures the
deployed model, and the zeroth-order method minimizes the deployed network's loss directly.

All share :meth:`Classifier.model_step` and the evaluation code, log ``train/loss``,
``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``, and write a ``robusttrain``
entry into every checkpoint so :func:`robusttrain.training.checkpoints.load_checkpoint` can rebuild
the backbone without unpickling code.
"""

from __future__ import annotations

import atexit
import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from robusttrain.noise.deployment import (
    Deployment,
    deploy_weights_,
    deployed,
    output_converters,
    parse_deployment,
)
from robusttrain.noise.seeds import draw_noise, pair_seed
from robusttrain.noise.weight import (
    NOISE_MODELS,
    check_noise,
    draw_directions,
    noisy_parameters,
    smoothing_sigmas,
)
from robusttrain.training.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from robusttrain.zo.estimators import (
    NonFiniteLossError,
    SmoothedGradEstimate,
    estimate_smoothed_grad,
    fitness_shaping_name,
)
from robusttrain.zo.parallel import (
    PARALLEL_MODES,
    all_gather_rows,
    engine_pair_losses,
    gather_pair_losses,
    loop_pair_losses,
    pair_share,
    rebuild_estimate,
)
from robusttrain.zo.perturbations import Perturbation
from robusttrain.zo.population import (
    BATCH_MODES,
    choose_population,
    population_smoothed_grad,
    split_rows,
    unsupported_reason,
)

__all__ = [
    "Classifier",
    "ZerothOrderClassifier",
    "NoiseInjectionClassifier",
    "QuantizationAwareClassifier",
    "frozen_stochastic_layers",
]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _step_seed(seed: int, step: int) -> int:
    """Seed of the perturbations of global step ``step``: a pure function of (run seed, step)."""
    return pair_seed(seed, step) ^ 0x5EED


def _deployment_seeds(seed: int, index: int) -> tuple[int, int]:
    """(chip seed, read-noise seed) number ``index`` of a step or evaluation with seed ``seed``."""
    return pair_seed(seed ^ 0xC41B, index), pair_seed(seed ^ 0x4EAD, index)


# the chip on which validation and test evaluate a model trained for a deployment: the same at
# every validation of a run (best.ckpt compares epochs on one chip), a different one per run seed
_EVAL_CHIP = 0xE7A1


def _batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """Seed of the global RNG for one training batch: a pure function of its place in the run."""
    return pair_seed(pair_seed(pair_seed(seed ^ 0xB47C, epoch), batch_idx), rank)


_EXIT_TEARDOWN_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Make sure a multi-process run tears its process group down before the interpreter exits.

    Lightning destroys the group at exit only for NCCL. A gloo group (CPU training with several
    processes) left alive until interpreter shutdown has its worker threads destroyed by static
    destructors, which aborts the process now and then ("terminate called without an active
    exception") after training has finished and every file has been written.
    """
    global _EXIT_TEARDOWN_REGISTERED
    if _EXIT_TEARDOWN_REGISTERED:
        return
    _EXIT_TEARDOWN_REGISTERED = True

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def _check_noise_level(noise: str | None, level: float | None, perturbation: str = "gaussian") -> None:
    """Validate the ``noise``/``level`` pair of a smoothed training method."""
    if noise is None:
        if level is not None:
            raise ValueError(
                f"level={level} needs a noise model: set noise to one of {', '.join(NOISE_MODELS)} "
                "(without one, the method smooths with the absolute sigma)"
            )
        return
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose one of {', '.join(NOISE_MODELS)}")
    if level is None:
        raise ValueError(
            f"noise {noise!r} needs a level (η_train, in the units of `robusttrain robustness "
            "--noise`), e.g. level: 0.05"
        )
    if check_noise(noise, level) == 0:
        raise ValueError("level must be > 0 (level 0 is no smoothing; use Classifier instead)")
    if noise == "multiplicative" and perturbation == "lowrank":
        raise ValueError(
            "noise 'multiplicative' cannot be low-rank: its scale |w| varies within a weight "
            "matrix, and |w|⊙(A Bᵀ) is a full-rank matrix; use perturbation: gaussian, or noise "
            "relative/absolute"
        )


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
            _load_backbone_weights(backbone, init_from)
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
            _destroy_process_group_at_exit()

    def model_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean forward pass: returns (mean cross-entropy loss, logits, targets)."""
        x, y = batch
        logits = self.backbone(x)
        return F.cross_entropy(logits, y), logits, y

    # ----- training --------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(_batch_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
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
        if self.deployment is None:
            loss, logits, y = self.model_step(batch)
        else:
            _, float_logits, y = self.model_step(batch)
            float_acc_metric(float_logits, y)
            self.log(f"{split}/float_acc", float_acc_metric, on_step=False, on_epoch=True)
            chip, _ = _deployment_seeds(self.seed, _EVAL_CHIP)
            _, reads = _deployment_seeds(chip, batch_idx)
            with deployed(self.backbone, self.deployment, device_seed=chip, inference_seed=reads):
                loss, logits, y = self.model_step(batch)
        loss_metric(loss, weight=y.numel())
        acc_metric(logits, y)
        self.log(f"{split}/loss", loss_metric, on_step=False, on_epoch=True)
        self.log(f"{split}/acc", acc_metric, on_step=False, on_epoch=True, prog_bar=True)

    # ----- optimizers ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
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

def _load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Copy the backbone weights of checkpoint ``path`` into ``backbone`` (``init_from``)."""
    try:
        source = load_checkpoint(path).backbone
    except CheckpointError as err:
        raise ValueError(f"init_from: {err}") from None
    try:
        backbone.load_state_dict(source.state_dict())
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"init_from: the backbone of {path} does not fit this run's backbone ({first}); "
            "start from a checkpoint of the same architecture"
        ) from None


@contextlib.contextmanager
def frozen_stochastic_layers(model: nn.Module) -> Iterator[None]:
    """Freeze BatchNorm statistics and dropout for perturbed forward passes.

    Inside the block, BatchNorm layers in training mode still normalize with the batch's own
    statistics but do not update their running estimates (momentum 0, counters restored), and
    dropout layers are in eval mode, so the two members of an antithetic pair see the same
    network except for the weight perturbation (as in SAM's ``bypass_bn``).
    """
    saved_bn = []
    saved_dropout = []
    for module in model.modules():
        if isinstance(module, _BN_TYPES) and module.training and module.track_running_stats:
            counter = module.num_batches_tracked
            saved_bn.append((module, module.momentum, None if counter is None else counter.clone()))
            module.momentum = 0.0
        elif isinstance(module, _DROPOUT_TYPES) and module.training:
            saved_dropout.append(module)
            module.eval()
    try:
        yield
    finally:
        for module, momentum, counter in saved_bn:
            module.momentum = momentum
            if counter is not None:
                module.num_batches_tracked.copy_(counter)
        for module in saved_dropout:
            module.train()


class ZerothOrderClassifier(Classifier):
    """Trains on the Gaussian-smoothed loss from forward passes only.

    Each training step: one clean forward (logged as ``train/loss``; it also updates BatchNorm
    statistics), then the estimator of ∇L_σ (2·num_pairs perturbed forwards with BatchNorm and
    dropout frozen), written into ``.grad`` for the optimizer. The perturbation seed is a function of
    ``seed`` and the global step only, so a run resumed from a checkpoint continues exactly as the
    uninterrupted run would.

    Args:
        backbone: the network (see :class:`Classifier`).
        optimizer: optimizer factory; SGD with ``momentum`` or ``nesterov=True`` are the usual ones.
        scheduler: optional per-epoch learning-rate scheduler factory.
        num_classes: see :class:`Classifier`.
        sigma: smoothing scale σ (absolute, in weight units) of L_σ; with ``noise`` set, the
            absolute σ of the tensors the noise model leaves alone (biases, norm parameters).
        num_pairs: antithetic pairs N per step (2N perturbed forward passes).
        estimator: ``"antithetic"``, ``"one_sided"`` or ``"plain"`` (see
            :func:`robusttrain.zo.estimators.smoothed_loss_grad`).
        fitness_shaping: transform the losses before weighting the directions: ``false``/``none``
            (default, unbiased for ∇L_σ), ``true``/``centered_ranks`` or ``zscore`` (scale-free
            steps; see :func:`robusttrain.zo.estimators.pair_coefficients`).
        perturbation: ``"gaussian"`` (default: exact Gaussian smoothing) or ``"lowrank"``
            (rank-``rank`` directions on Linear/Conv weights, EGGROLL; see
            :mod:`robusttrain.zo.perturbations`).
        rank: r of the low-rank directions.
        batch_mode: ``"shared"`` (every pair sees the whole batch) or ``"split"`` (pair i sees
            its own ⌊B/N⌋ examples, so a step costs about two forward passes of the batch
            whatever N is; antithetic only).
        seed: base seed of the perturbations.
        population: evaluate all perturbed copies in one batched pass (exact; any network of
            Linear/Conv2d/norm layers, see :mod:`robusttrain.zo.population`); ``None`` uses it
            whenever the backbone is supported (not with BatchNorm in training mode).
        skip_nonfinite: when a perturbed loss is NaN/inf, skip the step (and count it in
            ``zo/skipped_steps``) instead of stopping the run.
        noise: smooth in the units of a weight-noise model — ``"relative"`` (η·max|W| per
            tensor), ``"absolute"`` or ``"multiplicative"`` (η·|w|), the models of
            ``robusttrain robustness`` applied to the same tensors (Linear/Conv weights); see
            :func:`robusttrain.noise.smoothing_sigmas`. ``None`` (default): absolute ``sigma``
            on every parameter.
        level: η_train, the smoothing level in the units of ``noise`` (required with it).
        parallel: how several processes (``--trainer.strategy ddp``) share a step. ``"data"``
            (default): each process evaluates all 2N members on its shard of the batch and the
            processes all-reduce their d-float estimates. ``"population"``: each process
            evaluates its share of the pairs (:func:`robusttrain.zo.parallel.pair_share`) on the
            whole batch, the processes all-gather the 2N losses, and every process rebuilds the
            estimate from the seeds (:mod:`robusttrain.zo.parallel`); every process must then load
            the same batches (``--trainer.use_distributed_sampler false``; checked). In one
            process ``"population"`` runs the same three steps, so a run gives the same numbers
            on 1, 2 or 3 processes (bit for bit with the in-place loop). Antithetic only.
        sync_check_every: every that many steps, check that all processes hold the same
            parameters (and, with ``parallel: population``, got the same batch); a mismatch
            stops the run naming the step. 0 (default) checks nothing.
        deployment: train through this deployment (see :class:`Classifier`): every perturbed
            member's loss is the loss of the deployed network, L(D(θ ± σz_i)) — quantized,
            faulty, noisy, whatever the deployment does; no gradient of it is needed. Pair i of
            step t runs on its own chip with its own read noise (seeds from (seed, t, i), so
            resuming stays exact), the same for both members of the pair (common random
            numbers: the difference of the pair is the effect of the direction, not of the
            chip). The estimate is then that of ∇ E_{g, chip, noise}[L(D(θ + σg))]. Antithetic
            only; runs the in-place loop (the batched engine cannot run the hooks).
        init_from: see :class:`Classifier`.
    """

    method = "zeroth_order"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        sigma: float = 0.01,
        num_pairs: int = 16,
        estimator: Literal["antithetic", "one_sided", "plain"] = "antithetic",
        fitness_shaping: bool | Literal["none", "centered_ranks", "zscore"] = False,
        perturbation: Literal["gaussian", "lowrank"] = "gaussian",
        rank: int = 1,
        batch_mode: Literal["shared", "split"] = "shared",
        seed: int = 0,
        population: bool | None = None,
        skip_nonfinite: bool = False,
        noise: Literal["relative", "absolute", "multiplicative"] | None = None,
        level: float | None = None,
        parallel: Literal["data", "population"] = "data",
        sync_check_every: int = 0,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        if self.deployment is not None and estimator != "antithetic":
            raise ValueError(
                f"training through a deployment needs estimator 'antithetic' (both members of a "
                f"pair run on the same chip with the same read noise), got {estimator!r}"
            )
        if self.deployment is not None and population:
            raise ValueError(
                "population=True cannot train through a deployment (the batched engine cannot run "
                "its hooks); use population: null or false (the in-place loop)"
            )
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        _check_noise_level(noise, level, perturbation)
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
        if parallel == "population" and estimator != "antithetic":
            raise ValueError(
                f"parallel 'population' exchanges antithetic loss pairs; it needs estimator "
                f"'antithetic', got {estimator!r}"
            )
        if isinstance(sync_check_every, bool) or not isinstance(sync_check_every, int) or (
                sync_check_every < 0):
            raise ValueError(f"sync_check_every must be an integer >= 0, got {sync_check_every!r}")
        if not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs}")
        Perturbation(perturbation, rank)  # checks both, with a message naming the fix
        fitness_shaping_name(fitness_shaping)
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
        if batch_mode == "split" and estimator != "antithetic":
            raise ValueError(
                f"batch_mode 'split' needs estimator 'antithetic', got {estimator!r} (a pair on its "
                "own examples needs its own baseline, which only the antithetic pair gives)"
            )
        self.sigma = sigma
        self.num_pairs = num_pairs
        self.estimator = estimator
        self.fitness_shaping = fitness_shaping
        self.perturbation = perturbation
        self.rank = rank
        self.batch_mode = batch_mode
        self.population = population
        self.skip_nonfinite = skip_nonfinite
        self.noise = noise
        self.level = None if level is None else float(level)
        self.parallel = parallel
        self.sync_check_every = sync_check_every
        self.automatic_optimization = False
        self._forward_passes = 0
        self._skipped_steps = 0

    def smoothing_scale(self, params: list[torch.Tensor]) -> float | list[torch.Tensor | float]:
        """The σ of this step: ``sigma``, or per tensor from the noise model at the clean θ."""
        if self.noise is None:
            return self.sigma
        return smoothing_sigmas(self.backbone, params, noise=self.noise, level=self.level,
                                sigma=self.sigma)

    def _use_population(self) -> bool:
        if self.population is False or self.deployment is not None:
            return False
        if self.population is None:
            return choose_population(self.backbone, self.device, self.batch_mode)
        reason = unsupported_reason(self.backbone, Perturbation(self.perturbation, self.rank))
        if reason is not None:
            raise ValueError(
                f"population=True cannot run {type(self.backbone).__name__}: {reason}. Use "
                "population: null (chooses the in-place loop for it)"
            )
        return True

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        seed = _step_seed(self.seed, self.global_step)
        with torch.no_grad():
            loss, logits, _ = self.model_step(batch)  # also updates BatchNorm statistics
            if self.deployment is not None:  # log the loss that is minimized: the deployed one
                chip, reads = _deployment_seeds(seed, self.num_pairs)
                with deployed(self.backbone, self.deployment, device_seed=chip,
                              inference_seed=reads):
                    loss, logits, _ = self.model_step(batch)
        self._log_train(loss, logits, y)
        options = {
            "sigma": self.smoothing_scale(params),
            "num_pairs": self.num_pairs,
            "seed": seed,
            "estimator": self.estimator,
            "fitness_shaping": self.fitness_shaping,
            "perturbation": self.perturbation,
            "rank": self.rank,
        }
        try:
            with frozen_stochastic_layers(self.backbone):
                if self.parallel == "population":
                    estimate = self._population_parallel_estimate(x, y, params, options)
                elif self._use_population():
                    estimate = population_smoothed_grad(
                        self.backbone, x, y, batch_mode=self.batch_mode, **options
                    )
                else:
                    rows = (split_rows(x.shape[0], self.num_pairs, x.device)
                            if self.batch_mode == "split" else None)
                    loss_fn, pair_loss = self._member_loss(x, y, rows, seed)
                    estimate = estimate_smoothed_grad(loss_fn, params, pair_loss=pair_loss,
                                                      **options)
                    if rows is not None:
                        estimate.forward_equivalents = 2 * rows.numel() / x.shape[0]
        except NonFiniteLossError as err:
            if not self.skip_nonfinite:
                raise
            self._skipped_steps += 1
            self.log("zo/skipped_steps", float(self._skipped_steps))
            self.print(f"step {self.global_step}: skipped ({err})")
            return
        # in units of forward passes of the whole batch (a split step sees each example twice)
        self._forward_passes += estimate.forward_equivalents + 1 + (self.deployment is not None)
        grads = estimate.grads
        if self.trainer.world_size > 1 and self.parallel == "data":
            # every process used the same directions on its own shard of the batch: the mean of
            # the estimates is the estimate on the whole batch (it is linear in the losses)
            # (one all-reduce of the concatenated estimate: one latency instead of one per tensor)
            flat = self.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]),
                                                reduce_op="mean")
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        grad_sq = torch.zeros((), device=self.device)
        for p, g in zip(params, grads):
            p.grad = g
            grad_sq += g.float().pow(2).sum()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.log("zo/grad_norm", grad_sq.sqrt())
        self.log("zo/mean_abs_diff", float(estimate.mean_abs_diff))
        self.log("zo/forward_passes", float(self._forward_passes))

    def _population_parallel_estimate(
        self, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], options: dict[str, Any]
    ) -> SmoothedGradEstimate:
        """This process's share of the pairs, the exchange of losses, the rebuilt estimate."""
        start, stop = pair_share(self.num_pairs, self.trainer.world_size, self.trainer.global_rank)
        common = {"sigma": options["sigma"], "num_pairs": self.num_pairs, "seed": options["seed"],
                  "start": start, "stop": stop, "perturbation": self.perturbation,
                  "rank": self.rank}
        rows = split_rows(x.shape[0], self.num_pairs, x.device) if self.batch_mode == "split" else None
        if stop == start:
            local = torch.empty(0, 2, dtype=torch.float64)
        elif self._use_population():
            local = engine_pair_losses(self.backbone, x, y, batch_mode=self.batch_mode, **common)
        else:
            loss_fn, pair_loss = self._member_loss(x, y, rows, options["seed"])
            local = loop_pair_losses(loss_fn, params, pair_loss=pair_loss, **common)
        losses = gather_pair_losses(local, self.num_pairs)
        grads = rebuild_estimate(params, losses, sigma=options["sigma"], seed=options["seed"],
                                 fitness_shaping=self.fitness_shaping,
                                 perturbation=self.perturbation, rank=self.rank)
        rows_per_member = x.shape[0] if rows is None else rows.shape[1]
        return SmoothedGradEstimate(
            grads, losses[:, 0], losses[:, 1], None, 2 * (stop - start),
            2 * (stop - start) * rows_per_member / x.shape[0],
        )

    def _member_loss(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None, seed: int
    ) -> tuple[Any, bool]:
        """The loss of one perturbed member for the in-place loop, and whether it takes the pair.

        Pair i sees rows ``rows[i]`` of the batch (split mode) or all of it, and, with a
        deployment, runs on chip/read-noise seeds number i of the step (both members alike).
        """
        def batch_of(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (x, y) if rows is None else (x[rows[i]], y[rows[i]])

        if self.deployment is None:
            if rows is None:
                return (lambda: F.cross_entropy(self.backbone(x), y)), False
            return (lambda i: F.cross_entropy(self.backbone(x[rows[i]]), y[rows[i]])), True

        def deployed_loss(i: int) -> torch.Tensor:
            chip, reads = _deployment_seeds(seed, i)
            xi, yi = batch_of(i)
            with deployed(self.backbone, self.deployment, device_seed=chip, inference_seed=reads):
                return F.cross_entropy(self.backbone(xi), yi)

        return deployed_loss, True

    def on_train_start(self) -> None:
        if self.parallel != "population" or self.trainer.world_size == 1:
            return
        loader = self.trainer.train_dataloader
        samplers = [getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
        if any(isinstance(s, torch.utils.data.DistributedSampler) for s in samplers):
            raise ValueError(
                "parallel 'population' evaluates each process's pairs on the whole batch, so every "
                "process must load the same batches: start the trainer with "
                "use_distributed_sampler=False (--trainer.use_distributed_sampler false)"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        k = self.sync_check_every
        if not k or self.trainer.world_size == 1 or self.global_step % k:
            return
        flat = torch.cat([p.detach().double().flatten() for p in self.backbone.parameters()])
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        fingerprint = [flat.sum(), (flat * weights).sum(), flat.abs().max()]
        if self.parallel == "population":
            x, y = batch
            fingerprint += [x.double().sum(), y.double().sum()]
        gathered = all_gather_rows(torch.stack(fingerprint))
        if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
            same_params = all(torch.equal(gathered[0, :3], row[:3]) for row in gathered[1:])
            what = "batches" if same_params else "parameters"
            raise RuntimeError(
                f"the processes hold different {what} at step {self.global_step} (fingerprints "
                f"{gathered.tolist()}); they must stay identical — report this with the config"
            )

    def on_train_epoch_end(self) -> None:
        self._step_scheduler_manually()

    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta.update(sigma=self.sigma, num_pairs=self.num_pairs, estimator=self.estimator,
                    perturbation=self.perturbation, rank=self.rank, batch_mode=self.batch_mode,
                    noise=self.noise, level=self.level)
        return meta

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["robusttrain"]["forward_passes"] = self._forward_passes
        checkpoint["robusttrain"]["skipped_steps"] = self._skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint.get("robusttrain", {})
        self._forward_passes = float(meta.get("forward_passes", 0))
        self._skipped_steps = int(meta.get("skipped_steps", 0))


class NoiseInjectionClassifier(Classifier):
    """Backprop on the smoothed loss: the gradient at θ + σg (fresh g each step) updates θ.

    ∇_θ L(θ + σg) with g ~ N(0, I) is an unbiased one-sample estimate of ∇L_σ(θ) (the
    reparameterisation trick), so this method minimizes the same objective as
    :class:`ZerothOrderClassifier` with first-order information — the fair control for it (noise
    injection / random weight perturbation training). Without ``noise`` every trainable parameter
    is perturbed by σg, as in the zeroth-order method. With ``noise`` the perturbation is one draw
    of that deployment noise model at ``level`` — w + level·s(w)·ε on the tensors ``robusttrain
    robustness`` perturbs, from the same code (:func:`robusttrain.noise.draw_directions`): the
    hardware-aware training of analog-AI toolkits (IBM aihwkit; Joshi et al. 2020); the other
    parameters are left clean (backprop gives them their gradient). The clean weights are
    restored bit for bit before the optimizer step.

    Args:
        backbone: the network.
        optimizer: optimizer factory.
        scheduler: optional per-epoch learning-rate scheduler factory.
        num_classes: see :class:`Classifier`.
        sigma: smoothing scale σ (absolute, in weight units); unused when ``noise`` is set.
        seed: base seed of the perturbations (with the global step, fixes each step's g).
        noise: ``"relative"``, ``"absolute"`` or ``"multiplicative"`` (see
            :mod:`robusttrain.noise.weight`); ``None``: absolute ``sigma`` on every parameter.
        level: η_train in the units of ``noise`` (required with it).
        deployment, init_from: see :class:`Classifier` (validation through the deployment).
    """

    method = "noise_injection"

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        sigma: float = 0.01,
        seed: int = 0,
        noise: Literal["relative", "absolute", "multiplicative"] | None = None,
        level: float | None = None,
        deployment: str | list[dict[str, Any]] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        _check_noise_level(noise, level)
        self.sigma = sigma
        self.noise = noise
        self.level = None if level is None else float(level)
        self.automatic_optimization = False

    def _perturbation(
        self, params: list[torch.Tensor], generator: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to move and their changes for this step."""
        if self.noise is None:
            noise = draw_noise(params, generator)
            changes = [z.view_as(p) * self.sigma for z, p in zip(noise.split(
                [p.numel() for p in params]), params)]
            return params, changes
        trainable = {id(p) for p in params}
        tensors = [p for _, p in noisy_parameters(self.backbone) if id(p) in trainable]
        directions = draw_directions(tensors, self.noise, generator)
        return tensors, [d * self.level for d in directions]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_step_seed(self.seed, self.global_step))
        moved, changes = self._perturbation(params, generator)
        return self._step_with_gradient_at(batch, moved,
                                           lambda: torch._foreach_add_(moved, changes))

    def on_train_epoch_end(self) -> None:
        self._step_scheduler_manually()

    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta.update(sigma=self.sigma, noise=self.noise, level=self.level)
        return meta



class QuantizationAwareClassifier(Classifier):
    """Backprop through a deployment with the straight-through estimator (QAT, and QAT + noise).

    Each step writes one draw of the deployed weights D(θ) into the network — the deployment's
    device steps (quantization, a fresh chip of stuck-at faults / bit flips) and one draw of its
    read noise, seeds from (seed, step) — runs the forward pass (output converters with a
    straight-through rounding), takes the gradient at D(θ), restores θ bit for bit and lets the
    optimizer step θ with it: the straight-through estimator ∂D/∂θ := I of quantization-aware
    training (Bengio et al. 2013; Jacob et al. 2018). With a deployment of quantization only this
    is QAT; with read noise and faults in it, QAT + noise injection (the hardware-aware training
    of analog-AI toolkits). The float θ are the trained parameters; the deployment is applied to
    them at evaluation, as to any other model.

    Args:
        backbone, optimizer, scheduler, num_classes, seed, init_from: see :class:`Classifier`.
        deployment: the deployment to train through (required); validation runs through it too.
    """

    method = "quantization_aware"

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
        if deployment is None:
            raise ValueError(
                "QuantizationAwareClassifier needs a deployment to train through: a preset (e.g. "
                "deployment: int4), a YAML file or a list of steps"
            )
        super().__init__(backbone, optimizer, scheduler, num_classes, seed, deployment, init_from)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weights = [p for _, p in noisy_parameters(self.backbone)]
        chip, reads = _deployment_seeds(_step_seed(self.seed, self.global_step), 0)
        device = weights[0].device

        def deploy() -> None:
            deploy_weights_(weights, self.deployment,
                            torch.Generator(device=device).manual_seed(chip),
                            torch.Generator(device=device).manual_seed(reads))

        return self._step_with_gradient_at(
            batch, weights, deploy,
            output_converters(self.backbone, self.deployment, straight_through=True))

    def on_train_epoch_end(self) -> None:
        self._step_scheduler_manually()

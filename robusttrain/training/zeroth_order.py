"""Zeroth-order training: :class:`ZerothOrderClassifier` minimizes L_σ from forward passes only.

The estimate of ∇L_σ(θ) (the antithetic estimator of :mod:`robusttrain.zo.estimators`, or the
batched population engine of :mod:`robusttrain.zo.population`, or the population-parallel steps of
:mod:`robusttrain.zo.parallel`) is written into ``.grad`` and any ``torch.optim`` optimizer (SGD
with momentum or Nesterov, Adam, ...) takes the step. With a deployment, every member's loss is
the deployed network's.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from robusttrain.noise.deployment import deployed
from robusttrain.noise.weight import smoothing_sigmas
from robusttrain.training.backprop import Classifier
from robusttrain.training.base import (
    check_noise_level,
    deployment_seeds,
    frozen_stochastic_layers,
    step_seed,
)
from robusttrain.zo.coefficients import (
    NonFiniteLossError,
    SmoothedGradEstimate,
    fitness_shaping_name,
)
from robusttrain.zo.estimators import estimate_smoothed_grad
from robusttrain.zo.node import node_smoothed_grad, node_unsupported_reason
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

__all__ = ["ZerothOrderClassifier"]


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
            steps; see :func:`robusttrain.zo.coefficients.pair_coefficients`).
        perturbation: ``"gaussian"`` (default: exact Gaussian smoothing), ``"lowrank"``
            (rank-``rank`` directions on Linear/Conv weights, EGGROLL; see
            :mod:`robusttrain.zo.perturbations`) or ``"node"``: the same Gaussian weight noise,
            drawn for every example on its own and Rao–Blackwellized onto what its losses see
            (:mod:`robusttrain.zo.node`; unbiased for the same ∇L_σ, far lower variance).
            ``num_pairs`` is then the pairs per example; networks of Linear/Conv2d layers only;
            antithetic, ``batch_mode: shared``, no fitness shaping, no deployment.
        rank: r of the low-rank directions.
        orthogonal: draw the N directions of a step as one block made orthogonal, each with a
            chi-distributed length (Choromanski et al. 2018): every direction keeps the law of
            its family, so the same L_σ, with less variance when N is a sizeable fraction of the
            number of parameters (docs/theory.md §15). Gaussian and low-rank.
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
        perturbation: Literal["gaussian", "lowrank", "node"] = "gaussian",
        rank: int = 1,
        orthogonal: bool = False,
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
        check_noise_level(noise, level, perturbation)
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
        if perturbation == "node":
            _check_node_options(estimator, fitness_shaping, batch_mode, parallel,
                                self.deployment is not None, population)
            reason = node_unsupported_reason(backbone)
            if reason is not None:
                raise ValueError(f"perturbation 'node' cannot train {type(backbone).__name__}: "
                                 f"{reason}")
        else:
            Perturbation(perturbation, rank, orthogonal)  # checks all three, naming the fix
        if perturbation == "node" and orthogonal:
            raise ValueError("orthogonal directions are for perturbation gaussian or lowrank; node "
                             "perturbation draws each example's noise independently")
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
        self.orthogonal = orthogonal
        self.batch_mode = batch_mode
        self.population = population
        self.skip_nonfinite = skip_nonfinite
        self.noise = noise
        self.level = None if level is None else float(level)
        self.parallel = parallel
        self.sync_check_every = sync_check_every
        self.automatic_optimization = False
        self._forward_passes: float = 0  # whole-batch forward passes (fractional in split mode)
        self._skipped_steps = 0

    def smoothing_scale(self, params: list[torch.Tensor]) -> float | list[torch.Tensor | float]:
        """The σ of this step: ``sigma``, or per tensor from the noise model at the clean θ."""
        if self.noise is None:
            return self.sigma
        assert self.level is not None  # __init__ (check_noise_level) requires it with noise
        return smoothing_sigmas(self.backbone, params, noise=self.noise, level=self.level,
                                sigma=self.sigma)

    def _use_population(self) -> bool:
        if self.population is False or self.deployment is not None:
            return False
        if self.population is None:
            return choose_population(self.backbone, self.device, self.batch_mode)
        reason = unsupported_reason(self.backbone,
                                    Perturbation(self.perturbation, self.rank, self.orthogonal))
        if reason is not None:
            raise ValueError(
                f"population=True cannot run {type(self.backbone).__name__}: {reason}. Use "
                "population: null (chooses the in-place loop for it)"
            )
        return True

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers gives one optimizer
        params: list[torch.Tensor] = [p for p in self.backbone.parameters() if p.requires_grad]
        seed = step_seed(self.seed, self.global_step)
        with torch.no_grad():
            loss, logits, _ = self.model_step(batch)  # also updates BatchNorm statistics
            if self.deployment is not None:  # log the loss that is minimized: the deployed one
                chip, reads = deployment_seeds(seed, self.num_pairs)
                with deployed(self.backbone, self.deployment, device_seed=chip,
                              inference_seed=reads):
                    loss, logits, _ = self.model_step(batch)
        self._log_train(loss, logits, y)
        options: dict[str, Any] = {  # the keyword arguments every estimator path takes
            "sigma": self.smoothing_scale(params),
            "num_pairs": self.num_pairs,
            "seed": seed,
            "estimator": self.estimator,
            "fitness_shaping": self.fitness_shaping,
            "perturbation": self.perturbation,
            "rank": self.rank,
            "orthogonal": self.orthogonal,
        }
        try:
            with frozen_stochastic_layers(self.backbone):
                if self.perturbation == "node":
                    estimate = node_smoothed_grad(self.backbone, x, y, sigma=options["sigma"],
                                                  num_pairs=self.num_pairs, seed=seed)
                elif self.parallel == "population":
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
            self._skip_step(err)
            return
        # in units of forward passes of the whole batch (a split step sees each example twice)
        assert estimate.forward_equivalents is not None  # SmoothedGradEstimate fills it in
        self._forward_passes += estimate.forward_equivalents + 1 + (self.deployment is not None)
        grads = estimate.grads
        if self.trainer.world_size > 1 and self.parallel == "data":
            # every process used the same directions on its own shard of the batch: the mean of
            # the estimates is the estimate on the whole batch (it is linear in the losses)
            # (one all-reduce of the concatenated estimate: one latency instead of one per tensor)
            flat = self.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]),
                                                reduce_op="mean")
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        self._step_with(optimizer, params, grads, estimate)

    def _skip_step(self, err: NonFiniteLossError) -> None:
        """A perturbed loss was NaN/inf: re-raise, or with ``skip_nonfinite`` count and log it."""
        if not self.skip_nonfinite:
            raise err
        self._skipped_steps += 1
        self.log("zo/skipped_steps", float(self._skipped_steps))
        self.print(f"step {self.global_step}: skipped ({err})")

    def _step_with(self, optimizer: Any, params: list[torch.Tensor], grads: list[torch.Tensor],
                   estimate: SmoothedGradEstimate) -> None:
        """Write the estimate into ``.grad``, take the optimizer step and log the step's figures."""
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
                  "rank": self.rank, "orthogonal": self.orthogonal}
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
                                 perturbation=self.perturbation, rank=self.rank,
                                 orthogonal=self.orthogonal)
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
            chip, reads = deployment_seeds(seed, i)
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
                    perturbation=self.perturbation, rank=self.rank, orthogonal=self.orthogonal,
                    batch_mode=self.batch_mode,
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


def _check_node_options(estimator: str, fitness_shaping: bool | str, batch_mode: str,
                        parallel: str, deployment: bool, population: bool | None) -> None:
    """The settings node perturbation cannot take, each refused with the reason and the fix."""
    problems = []
    if estimator != "antithetic":
        problems.append(f"estimator {estimator!r} (it is an antithetic estimator; use antithetic)")
    if fitness_shaping_name(fitness_shaping) != "none":
        problems.append(f"fitness_shaping {fitness_shaping!r} (its per-example coefficients are "
                        "the raw loss differences; use false)")
    if batch_mode != "shared":
        problems.append(f"batch_mode {batch_mode!r} (every example already has its own draws; "
                        "use shared)")
    if parallel != "data":
        problems.append(f"parallel {parallel!r} (use data)")
    if deployment:
        problems.append("a deployment (use perturbation gaussian or lowrank to train through one)")
    if population:
        problems.append("population: true (node perturbation has its own batched pass; use null)")
    if problems:
        raise ValueError("perturbation 'node' cannot take " + "; ".join(problems))

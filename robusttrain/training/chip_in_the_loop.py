r"""Zeroth-order fine-tuning of one chip in the loop: :class:`ChipInTheLoopClassifier`.

Every member of an antithetic pair is programmed into the chip and run on the batch; its loss is
the cross-entropy of the logits the chip returns. Nothing else of the chip is used — not its
quantizer, its faulty cells or its read noise, which the trainer cannot see
(:mod:`robusttrain.noise.chip`). A real chip draws fresh read noise at every inference, so the
two members of a pair do not share it: the estimate is unbiased for the gradient of this chip's
smoothed expected loss, ∇_θ E_g E_n[ℓ_c(θ + σg; n)], with a variance term from the read noise that
common random numbers would have removed (docs/theory.md §19): averaging ``reads_per_member``
inferences per member divides it by that number.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from robusttrain.noise.chip import Chip, ChipPort, ChipQueries
from robusttrain.training.base import step_seed
from robusttrain.training.zeroth_order import ZerothOrderClassifier
from robusttrain.zo.coefficients import NonFiniteLossError, SmoothedGradEstimate
from robusttrain.zo.estimators import estimate_smoothed_grad

__all__ = ["ChipInTheLoopClassifier", "chip_smoothed_grad"]


def chip_smoothed_grad(
    chip: ChipPort,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float | list[torch.Tensor | float],
    num_pairs: int,
    seed: int,
    reads_per_member: int = 1,
    fitness_shaping: bool | str = False,
    perturbation: str = "gaussian",
    rank: int = 1,
    orthogonal: bool = False,
) -> SmoothedGradEstimate:
    """The in-the-loop antithetic estimate for ``model``'s trainable parameters, from ``chip`` only.

    Member ±i: θ ± σz_i is written into ``model`` (in place, restored after), programmed into the
    chip and run ``reads_per_member`` times on (x, y); its loss is the mean cross-entropy of those
    inferences. The directions are those of :func:`robusttrain.zo.estimators.estimate_smoothed_grad`
    for the same arguments; each member's read noise is its own (docs/theory.md §19).
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def member_loss() -> torch.Tensor:
        chip.program(model)
        losses = [F.cross_entropy(chip.run(x), y) for _ in range(reads_per_member)]
        return torch.stack(losses).mean()

    return estimate_smoothed_grad(member_loss, params, sigma=sigma, num_pairs=num_pairs, seed=seed,
                                  estimator="antithetic", fitness_shaping=fitness_shaping,
                                  perturbation=perturbation, rank=rank, orthogonal=orthogonal)


class ChipInTheLoopClassifier(ZerothOrderClassifier):
    """Fine-tunes the float weights θ against one chip, from the chip's logits only.

    Each training step: θ is programmed and run once on the batch (``train/loss``, the chip's
    loss), then for each of ``num_pairs`` antithetic pairs θ ± σz_i is programmed and run
    (``reads_per_member`` inferences each, their losses averaged), and
    ĝ = 1/(2σN) Σ_i [ℓ⁺_i − ℓ⁻_i] z_i goes to the optimizer. Validation and test run through the
    chip as well (``val/acc``; ``val/float_acc`` is the float network's); their queries are not
    counted as training queries. Logged: ``chip/train_examples``, ``chip/train_forward_passes``,
    ``chip/train_programs`` (cumulative, the cost of the fine-tune in chip queries).

    The trainer holds a :class:`robusttrain.noise.chip.ChipPort` — ``program``, ``run`` and
    ``queries`` — and never the chip object; the chip is not a hyperparameter and is not in the
    checkpoint (a checkpoint holds θ, which any chip can be programmed with). Resuming restores
    θ, the optimizer and the query counts, but not the chip's read-noise generator: the resumed
    run continues correctly, not bit for bit as the uninterrupted one (a real chip cannot be
    rewound either).

    Args:
        backbone, optimizer, scheduler, num_classes, seed, init_from: see
            :class:`robusttrain.training.Classifier`; ``init_from`` (the model to fine-tune,
            e.g. the PTQ or the QAT + noise model) is the usual start.
        chip: the chip (a :class:`robusttrain.noise.chip.Chip`; in a config
            ``{class_path: robusttrain.noise.SimulatedChip, init_args: {deployment: ..., seed: s}}``
            or a real device's class).
        sigma, num_pairs, fitness_shaping, perturbation, rank, orthogonal, noise, level,
            skip_nonfinite: see :class:`ZerothOrderClassifier` (``perturbation``: gaussian or
            lowrank; node perturbation needs the layers' inputs, which a chip does not give).
        reads_per_member: inferences averaged per member (divides the read-noise variance of
            each member's loss by it, at that many times the queries).
        trainable: fine-tune only the parameters whose names match one of these patterns
            (``fnmatch``, e.g. ``["*.bias", "net.3.*"]``: every bias and the last layer); the
            others stay as they are. The estimate's variance grows with the number of
            parameters it moves (docs/theory.md §4), so a few well-chosen ones can be fitted to a
            chip with far fewer queries. ``None`` (default): all of them.
    """

    method = "chip_in_the_loop"

    def __init__(
        self,
        backbone: nn.Module,
        chip: Chip,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
        sigma: float = 0.01,
        num_pairs: int = 16,
        fitness_shaping: bool | Literal["none", "centered_ranks", "zscore"] = False,
        perturbation: Literal["gaussian", "lowrank"] = "gaussian",
        rank: int = 1,
        orthogonal: bool = False,
        reads_per_member: int = 1,
        trainable: list[str] | None = None,
        seed: int = 0,
        skip_nonfinite: bool = False,
        noise: Literal["relative", "absolute", "multiplicative"] | None = None,
        level: float | None = None,
        init_from: str | None = None,
    ) -> None:
        if perturbation not in ("gaussian", "lowrank"):
            raise ValueError(f"perturbation must be gaussian or lowrank in the loop with a chip (node "
                             f"perturbation needs each layer's input, which a chip does not give), "
                             f"got {perturbation!r}")
        if isinstance(reads_per_member, bool) or not isinstance(reads_per_member, int) or (
                reads_per_member < 1):
            raise ValueError(f"reads_per_member must be an integer >= 1, got {reads_per_member!r}")
        if trainable is not None:
            names = [n for n, _ in backbone.named_parameters()]
            unmatched = [pat for pat in trainable if not fnmatch.filter(names, pat)]
            if not trainable or unmatched:
                raise ValueError(f"trainable: pattern(s) {unmatched or trainable} match no "
                                 f"parameter; the backbone has {', '.join(names)}")
            for name, p in backbone.named_parameters():
                p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in trainable))
        port = ChipPort(chip)  # checks the type; from here on only the port is kept
        super().__init__(backbone, optimizer, scheduler, num_classes, sigma=sigma,
                         num_pairs=num_pairs, fitness_shaping=fitness_shaping,
                         perturbation=perturbation, rank=rank, orthogonal=orthogonal, seed=seed,
                         population=False, skip_nonfinite=skip_nonfinite, noise=noise, level=level,
                         init_from=init_from)
        for name in ("_hparams", "_hparams_initial"):  # the chip is not a hyperparameter
            self.__dict__[name].pop("chip", None)
        self.chip = port
        self.reads_per_member = reads_per_member
        self.trainable = trainable
        self._train_queries = ChipQueries()
        self._eval_programmed = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers gives one optimizer
        params: list[torch.Tensor] = [p for p in self.backbone.parameters() if p.requires_grad]
        before = self.chip.queries
        with torch.no_grad():
            self.chip.program(self.backbone)
            logits = self.chip.run(x)
            self._log_train(F.cross_entropy(logits, y), logits, y)
        try:
            estimate = chip_smoothed_grad(
                self.chip, self.backbone, x, y, sigma=self.smoothing_scale(params),
                num_pairs=self.num_pairs, seed=step_seed(self.seed, self.global_step),
                reads_per_member=self.reads_per_member, fitness_shaping=self.fitness_shaping,
                perturbation=self.perturbation, rank=self.rank, orthogonal=self.orthogonal)
        except NonFiniteLossError as err:
            self._skip_step(err)
            return
        finally:
            self._train_queries = self._train_queries + (self.chip.queries - before)
        # whole-batch forward passes, as ZerothOrderClassifier counts them: the clean one and 2N·R
        self._forward_passes += 1 + 2 * self.num_pairs * self.reads_per_member
        self._step_with(optimizer, params, estimate.grads, estimate)
        self._log_queries()

    def _log_queries(self) -> None:
        self.log("chip/train_examples", float(self._train_queries.examples))
        self.log("chip/train_forward_passes", float(self._train_queries.forward_passes))
        self.log("chip/train_programs", float(self._train_queries.programs))

    @property
    def train_queries(self) -> ChipQueries:
        """The chip queries of the training steps so far (validation and test not counted)."""
        return self._train_queries

    # ----- evaluation through the chip ---------------------------------------------------------
    @property
    def evaluates_deployed(self) -> bool:
        return True  # validation and test run through the chip; val/float_acc is the float model

    def _eval_model_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        if not self._eval_programmed:  # once per validation or test: θ does not change in it
            self.chip.program(self.backbone)
            self._eval_programmed = True
        logits = self.chip.run(x)
        return F.cross_entropy(logits, y), logits, y

    def on_validation_epoch_start(self) -> None:
        self._eval_programmed = False

    def on_test_epoch_start(self) -> None:
        self._eval_programmed = False

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("chip/val_at_train_examples", float(self._train_queries.examples))

    # ----- checkpoints -------------------------------------------------------------------------
    def robusttrain_meta(self) -> dict[str, Any]:
        meta = super().robusttrain_meta()
        meta.update(reads_per_member=self.reads_per_member, trainable=self.trainable,
                    chip="hidden (not stored)")
        return meta

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        q = self._train_queries
        checkpoint["robusttrain"]["train_queries"] = [q.programs, q.forward_passes, q.examples]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counts = checkpoint.get("robusttrain", {}).get("train_queries")
        if counts is not None:
            self._train_queries = ChipQueries(*(int(c) for c in counts))


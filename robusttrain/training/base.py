"""What every trainer shares: seeds, ``init_from``, noise-level checks, frozen stochastic layers.

The seeding convention of a run: every random draw is a pure function of the run's ``seed`` and
the draw's place in the run (global step, pair, batch, process rank), built from
:func:`robusttrain.noise.seeds.pair_seed`, so a run resumed from any checkpoint draws what the
uninterrupted run drew.

* :func:`step_seed` — the perturbations of one global step;
* :func:`deployment_seeds` — (chip, read noise) of a step's pair or of an evaluation batch;
  :data:`EVAL_CHIP` numbers the chip of validation and test;
* :func:`batch_seed` — the global RNG (dropout) of one training batch.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from robusttrain.noise.seeds import pair_seed
from robusttrain.noise.weight import NOISE_MODELS, check_noise
from robusttrain.training.checkpoints import CheckpointError, load_checkpoint

__all__ = [
    "EVAL_CHIP",
    "batch_seed",
    "check_noise_level",
    "deployment_seeds",
    "destroy_process_group_at_exit",
    "frozen_stochastic_layers",
    "load_backbone_weights",
    "step_seed",
]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def step_seed(seed: int, step: int) -> int:
    """Seed of the perturbations of global step ``step``: a pure function of (run seed, step)."""
    return pair_seed(seed, step) ^ 0x5EED


def deployment_seeds(seed: int, index: int) -> tuple[int, int]:
    """(chip seed, read-noise seed) number ``index`` of a step or evaluation with seed ``seed``."""
    return pair_seed(seed ^ 0xC41B, index), pair_seed(seed ^ 0x4EAD, index)


# the chip on which validation and test evaluate a model trained for a deployment: the same at
# every validation of a run (best.ckpt compares epochs on one chip), a different one per run seed
EVAL_CHIP = 0xE7A1


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """Seed of the global RNG for one training batch: a pure function of its place in the run."""
    return pair_seed(pair_seed(pair_seed(seed ^ 0xB47C, epoch), batch_idx), rank)


_EXIT_TEARDOWN_REGISTERED = False


def destroy_process_group_at_exit() -> None:
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


def check_noise_level(noise: str | None, level: float | None, perturbation: str = "gaussian") -> None:
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


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Copy the backbone weights of checkpoint ``path`` into ``backbone`` (``init_from``)."""
    try:
        source = load_checkpoint(path, advice=_init_from_advice).backbone
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


def _init_from_advice(sibling: Path | None) -> str:
    if sibling is not None:
        return f"{sibling.name} in the same folder is whole: set init_from to {sibling}"
    return "set init_from to a checkpoint written by `robusttrain fit`"


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
                tracked = module.num_batches_tracked
                assert tracked is not None  # it was a tensor when the counter was saved
                tracked.copy_(counter)
        for module in saved_dropout:
            module.train()


"""The predictions of ``robusttrain predict``, written to one CSV file.

:class:`PredictionWriter` receives what :meth:`robusttrain.training.Classifier.predict_step`
returned for every batch — logits z (B, C) and labels (B,), through the model's deployment when it
has one — together with each image's index in the predicted split (Lightning tracks the indices of
every predict batch), and at the end of the predict epoch writes one row per image, in split order::

    index,label,predicted,prob_0,...,prob_{C-1}

where ``prob_c = softmax(z)_c = exp(z_c) / sum_k exp(z_k)`` (computed in float64, written with 9
significant digits, so a row sums to 1 within 1e-8) and ``predicted = argmax_c prob_c``, the class
``test/acc`` counts as the prediction. The file is written whole and atomically
(:func:`robusttrain.files.write_atomic`): a reader sees the previous file or the new one, never a
part.

With several processes (DDP) each process predicts its own share of the split (Lightning's
unrepeated distributed sampler: every image once); the rows are gathered to process 0, sorted by
index and written there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from robusttrain.files import write_atomic

__all__ = ["PREDICTIONS_FILE", "PredictionWriter"]

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Write the predict epoch's logits as ``index,label,predicted,prob_0,...`` rows to a CSV file.

    Registered by the LightningCLI as ``--predictions``; it acts only in ``predict`` (fit,
    validate and test never call its hooks).

    Args:
        path: the CSV file to write (its folder is created). ``None`` writes
            ``predictions.csv`` in the run's log folder (``trainer.log_dir``; for a checkpoint
            ``<run>/checkpoints/<name>.ckpt`` that is ``<run>/predict_<name>/``).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise ValueError(f"path must be a file path or null, got {path!r}")
        if path is not None and Path(path).is_dir():
            raise ValueError(f"path {path} is a folder; name the CSV file to write, "
                             f"e.g. {Path(path) / PREDICTIONS_FILE}")
        self.path = path

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # trainer.log_dir broadcasts from process 0: every process asks, only process 0 writes
        path = Path(self.path) if self.path else Path(trainer.log_dir or ".") / PREDICTIONS_FILE
        if len(batch_indices) != 1:
            raise RuntimeError(f"PredictionWriter writes the predictions of one dataloader; this "
                               f"predict loop had {len(batch_indices)}")
        index, logits, labels = _collect(predictions, batch_indices[0], trainer.world_size)
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (index, logits, labels))
            parts = [part for part in gathered if len(part[0])] or gathered[:1]  # drop empty shares
            index, logits, labels = (torch.cat([part[i] for part in parts]) for i in range(3))
        if not trainer.is_global_zero:
            return
        order = torch.argsort(index)
        num_classes = logits.shape[1] if len(logits) else int(getattr(pl_module, "num_classes", 0))
        write_atomic(path, predictions_csv(index[order], labels[order], logits[order], num_classes))
        print(f"predictions: {len(index)} rows written to {path}")


def _collect(
    predictions: Sequence[Any], batch_indices: Sequence[Sequence[int]], world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index (N,), logits (N, C), labels (N,)) of this process's batches, on the CPU."""
    logits, labels = [], []
    for output in predictions:
        if not (isinstance(output, (tuple, list)) and len(output) == 2
                and all(isinstance(t, torch.Tensor) for t in output)):
            raise TypeError("PredictionWriter needs predict_step to return (logits, labels) "
                            f"tensors, got {type(output).__name__}")
        logits.append(output[0].detach().cpu())
        labels.append(output[1].detach().cpu())
    if not logits:
        return (torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    if batch_indices:
        index = torch.as_tensor([i for batch in batch_indices for i in batch], dtype=torch.long)
    elif world_size == 1:  # a loader Lightning could not track: one process sees it in order
        index = torch.arange(sum(len(y) for y in labels))
    else:
        raise RuntimeError("the predict loader's batch indices are unknown, so the rows of "
                           "several processes cannot be put in order; predict with one device")
    return index, torch.cat(logits), torch.cat(labels)


def predictions_csv(
    index: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, num_classes: int
) -> str:
    """The CSV text of the rows ``index,label,predicted,prob_0,...,prob_{C-1}``.

    Args:
        index: (N,) each image's position in its split.
        labels: (N,) the true classes.
        logits: (N, C) the model's outputs; the probabilities are their softmax.
        num_classes: C, for the header when there are no rows.

    Example:
        >>> print(predictions_csv(torch.tensor([0, 1]), torch.tensor([1, 0]),
        ...                       torch.tensor([[0.0, 0.0], [2.0, 0.0]]), 2), end="")
        index,label,predicted,prob_0,prob_1
        0,1,0,0.5,0.5
        1,0,0,0.880797078,0.119202922
    """
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    predicted = probs.argmax(dim=1) if len(probs) else torch.zeros(0, dtype=torch.long)
    header = ",".join(["index", "label", "predicted", *(f"prob_{c}" for c in range(num_classes))])
    rows = [header]
    for i, y, p, row in zip(index.tolist(), labels.tolist(), predicted.tolist(), probs.tolist()):
        rows.append(f"{i},{y},{p}," + ",".join(f"{q:.9g}" for q in row))
    return "\n".join(rows) + "\n"

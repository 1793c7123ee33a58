"""Evaluations kept between calls of a comparison, so that an interrupted one does not start over.

A comparison evaluates many models × levels × draws (or × chips × read-noise runs). Each model's
evaluation — its rows, its summary and the settings of the evaluation — is written whole
(:func:`robusttrain.files.write_atomic`) to one JSON file in the model's run folder as soon as it
is done, together with the *key* it was computed under: what identifies the inputs (the SHA-256
of the checkpoint file, the SHA-256 of the evaluation inputs and labels, so also of ``max_images``
and the data files) and every argument of the evaluation (noise model, levels, draws, seed, or
the deployment and its draws), plus :data:`FORMAT`. A later call reuses the file when its key is
equal and evaluates the model again otherwise: a retrained checkpoint, other test data or any
changed setting gives another key. The device is not part of the key: a model evaluated on the
CPU is not evaluated again for ``--device cuda`` (the two differ only in float rounding).

JSON writes Python floats with ``repr`` and reads them back exactly, so results assembled from
kept files are the same bits as fresh ones, and the reports written from them are the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from robusttrain.files import write_atomic

__all__ = ["FORMAT", "file_digest", "keep", "kept", "kept_or_evaluate", "kept_path", "tensor_digest"]

# Part of every key: raise it when what an evaluation writes or computes changes, so that files
# written by an older robusttrain are evaluated again rather than reused.
FORMAT = 1


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The SHA-256 of the dtypes, shapes and values of ``tensors``, as hex."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)};".encode())
        # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12
        digest.update(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def kept_path(run_dir: Path, kind: str, name: str) -> Path:
    """``<run_dir>/evaluations/<kind>_<name>.json``, ``name`` reduced to letters, digits and ``._-=``.

    Two names that reduce to the same file only cost an evaluation: the key inside tells them
    apart.
    """
    return run_dir / "evaluations" / f"{kind}_{re.sub(r'[^A-Za-z0-9._=-]', '_', name)}.json"


def _normalized(key: Mapping[str, Any]) -> Any:
    """``key`` as it reads back from JSON (tuples become lists, ...), for comparing."""
    return json.loads(json.dumps(key))


def kept(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The value kept at ``path`` under ``key``; None when the file is missing, unreadable or was
    written under another key."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != _normalized({"format": FORMAT, **key}):
        return None
    return stored.get("value")


def keep(path: Path, key: Mapping[str, Any], value: Mapping[str, Any]) -> None:
    """Write ``value`` and ``key`` to ``path`` whole, for :func:`kept` to read back.

    Non-finite floats are written as ``NaN``/``Infinity`` (Python's JSON reads them back), so a
    value reads back equal to what was written.
    """
    text = json.dumps({"key": {"format": FORMAT, **key}, "value": value}, indent=1,
                      ensure_ascii=False)
    write_atomic(path, text + "\n")


def kept_or_evaluate(
    path: Path, key: Mapping[str, Any], evaluate: Callable[[], dict[str, Any]], *,
    evaluating: str, reusing: str,
) -> dict[str, Any]:
    """The value kept at ``path`` under ``key``, else ``evaluate()``, kept there at once.

    Args:
        path, key: where and under what the value is kept (:func:`kept`, :func:`keep`).
        evaluate: computes the value when none is kept under ``key``.
        evaluating, reusing: the line printed (after ``[compare] ``) before evaluating, or when
            the kept value is used.
    """
    value = kept(path, key)
    if value is not None:
        print(f"[compare] {reusing}")
        return value
    print(f"[compare] {evaluating}")
    value = evaluate()
    keep(path, key, value)
    return value

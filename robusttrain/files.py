"""Files written whole: a reader never sees a half-written result, checkpoint config or download."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either its old content or all of
    the new one; the temporary file is removed if anything fails (also on KeyboardInterrupt).

    Args:
        path: the destination; its folder is created if missing.
        data: bytes, or text (written as UTF-8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

"""Files written whole: a reader never sees a half-written result, checkpoint or download.

:func:`atomic_file` is the one way robusttrain replaces a file: the new content goes to a
temporary file in the destination's own folder (so the final rename never crosses file systems,
where it would become a copy into the destination), is flushed and ``fsync``-ed, and is then
renamed over the destination with ``os.replace``, which is atomic on POSIX file systems; the folder
is ``fsync``-ed after the rename so the new name survives a power cut. Until the rename the old
file is untouched, so a process killed mid-write, a full disk or a failing write leaves the
previous version whole, and the temporary file is removed on any error (also on
KeyboardInterrupt). A SIGKILL cannot run that clean-up: it may leave a ``.<name>.*.part`` file
beside the destination, never a damaged destination.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "write_atomic"]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success it replaces ``path``.

    Args:
        path: the destination; its folder is created if missing.

    Yields:
        The open temporary file. When the block ends normally it is flushed, fsynced, closed and
        renamed over ``path``; when the block raises, it is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_file(folder / "weights.bin") as f:
        ...     _ = f.write(b"all of it")
        >>> (folder / "weights.bin").read_bytes()
        b'all of it'
        >>> sorted(p.name for p in folder.iterdir())  # no temporary file left behind
        ['weights.bin']
        >>> import shutil
        >>> shutil.rmtree(folder)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole, through :func:`atomic_file`.

    Args:
        path: the destination; its folder is created if missing.
        data: bytes, or text (written as UTF-8).
    """
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)

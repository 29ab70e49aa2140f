"""Files that appear whole or not at all, and whether a process that left files behind is alive.

Used by the registry (versions, aliases, ``latest``), the batch job's output folder and the
fine-tuning caches and checkpoints: one way to write, one way to clean up after the dead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A hidden name beside ``path`` (readers skip dot files), unique per writer. The file gets the
    mode the umask gives, like every other file it replaces (``mkstemp`` would make it 0600, and a
    reader running as another user could no longer read what was written)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is fsynced and renamed onto ``path``, on
    any error (or interrupt) it is removed and ``path`` is left as it was."""
    tmp = temp_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a part."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists on this machine (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

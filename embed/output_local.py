"""A job's output folder on a local (or mounted) disk: each file written under a temporary name
and renamed into place, a ``flock`` on ``_lock`` while a job writes (see :mod:`embed.job_output`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from models.files import replacing, write_atomic

from .output import LOCK, OutputError, write_parquet

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def disk_problem(path: Path, e: OSError, doing: str = "write") -> OutputError:
    """One line for a failed write: a full disk or a file-size limit, a read-only or forbidden
    folder, anything else as the system says it."""
    why = e.strerror or str(e)
    if e.errno in _NO_SPACE:
        why += " (no room for the job's files: free some space)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        why += " (choose a writable --output)"
    return OutputError(f"cannot {doing} {path}: {why}")


@contextlib.contextmanager
def _writing(path: Path, doing: str = "write") -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise disk_problem(path, e, doing) from None


class LocalFolder:
    """The primitives :class:`embed.job_output.JobOutput` builds on, for a local folder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    def where(self, name: str) -> str:
        return str(self.path / name)

    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--output {self.path} exists and is not a folder")
        with _writing(self.path, "create the folder"):
            self.path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the folder for one job at a time (a second job fails at once, clearly)."""
        with _writing(self.path / LOCK):
            f = open(self.path / LOCK, "a+")  # noqa: SIM115 - closed by the with below, errors reported here
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"another embedding job is writing to {self.path}; wait for it or choose another --output"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def names(self, sub: str = "") -> list[str]:
        """The names directly in the folder (or in its sub-folder ``sub``)."""
        folder = self.path / sub
        return [p.name for p in folder.iterdir()] if folder.is_dir() else []

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]:
        """The content of each readable file of ``names`` (missing or unreadable ones are left out)."""
        found = {}
        for name in names:
            with contextlib.suppress(OSError):
                found[name] = (self.path / name).read_bytes()
        return found

    def write(self, name: str, data: bytes) -> None:
        path = self.path / name
        with _writing(path):
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, data)

    def write_table(self, name: str, table: pa.Table) -> None:
        path = self.path / name
        with _writing(path):
            path.parent.mkdir(exist_ok=True)
            with replacing(path) as tmp:
                write_parquet(table, tmp)

    def remove(self, name: str) -> None:
        """Delete a file or a sub-folder with what it holds."""
        path = self.path / name
        with _writing(path, "delete"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

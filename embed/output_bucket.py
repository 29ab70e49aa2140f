"""A job's output folder as a prefix in an object store (``s3://bucket/prefix``): every file is
one whole object (nothing to rename: a reader sees all of an object or none of it; written with
Arrow's S3 file system, see :mod:`models.storage`), and a lock object while a job writes
(:mod:`embed.bucket_lock`). See :mod:`embed.job_output` for what is written in which order."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from models.storage import arrow_error, arrow_fs, check_url, describe, filesystem, reporting

from .bucket_lock import bucket_lock
from .output import LOCK, OutputError, write_parquet


class BucketFolder:
    """The primitives :class:`embed.job_output.JobOutput` builds on, for an object-store prefix."""

    def __init__(self, url: str) -> None:
        self.location = check_url(url)
        self._root = self.location.split("://", 1)[1]  # bucket/prefix, as fsspec names it
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = filesystem(self.location)
        return self._fs

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _key(self, name: str) -> str:
        return f"{self._root}/{name}" if name else self._root

    def create(self) -> None:
        """Check that the bucket exists and that the prefix is no object (nothing is created:
        a prefix exists once an object is written under it)."""
        with reporting(self.location, "write to", OutputError):
            try:
                info = self.fs.info(self._root)
            except FileNotFoundError as e:
                message = describe(e, self.location, "write to")
                if "no bucket" in message:
                    raise OutputError(message) from None
                return
        if info.get("type") != "directory":
            raise OutputError(f"--output {self.location} is an object, not a prefix: choose a prefix")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return bucket_lock(self.fs, self.where(LOCK))

    def names(self, sub: str = "") -> list[str]:
        """The names directly under the prefix (or under ``prefix/sub``)."""
        with reporting(self.where(sub), "list", OutputError):
            try:
                entries = self.fs.ls(self._key(sub), detail=False)
            except FileNotFoundError:
                return []
        prefix = self._key(sub).rstrip("/") + "/"
        return [e[len(prefix) :].rstrip("/") for e in entries if e.startswith(prefix) and len(e) > len(prefix)]

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]:
        """The content of each object of ``names`` that can be read, fetched concurrently."""
        if not names:
            return {}
        keys = {self._key(n): n for n in names}
        with reporting(self.location, "read", OutputError):
            found = self.fs.cat(list(keys), on_error="omit")
        return {keys[k]: v for k, v in found.items() if k in keys}

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        try:
            with arrow_fs(self.location).open_output_stream(self._key(name)) as f:
                f.write(data)
        except OSError as e:
            raise OutputError(f"cannot write {self.where(name)}: {arrow_error(e)}") from None

    def write_table(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        write_parquet(table, sink)
        self.write(name, sink.getvalue())

    def remove(self, name: str) -> None:
        """Delete an object, or every object under ``prefix/name/``."""
        with reporting(self.where(name), "delete", OutputError), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(name), recursive=True)

"""A job's output: a local folder (:class:`embed.output_local.LocalFolder`) or an object-store
prefix (:class:`embed.output_bucket.BucketFolder`), and what a job does with it: refuse another
job's output, find the finished shards, write a shard, the errors file and the manifest (the
layout is in :mod:`embed.output`).

Both kinds of folder offer the same few primitives (``create``, ``lock``, ``names``,
``read_many``, ``write``, ``write_table``, ``remove``; each write whole or not at all), so the
rules of the output are written once, here.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from models.storage import is_url

from .output import (
    ERRORS,
    FRAGMENTS,
    LOCK,
    MANIFEST,
    SHARD_RECORDS,
    OutputError,
    ShardRecord,
    is_job_file,
    record_name,
    shard_name,
)
from .output_bucket import BucketFolder
from .output_local import LocalFolder


class Folder(Protocol):
    location: str

    def where(self, name: str) -> str: ...
    def create(self) -> None: ...
    def lock(self) -> contextlib.AbstractContextManager[None]: ...
    def names(self, sub: str = "") -> list[str]: ...
    def read_many(self, names: Sequence[str]) -> dict[str, bytes]: ...
    def write(self, name: str, data: bytes) -> None: ...
    def write_table(self, name: str, table: pa.Table) -> None: ...
    def remove(self, name: str) -> None: ...


def open_output(location: str | Path) -> JobOutput:
    """The output at ``location``: ``s3://bucket/prefix`` or a local folder. Touches nothing yet."""
    text = str(location)
    return JobOutput(BucketFolder(text) if is_url(text) else LocalFolder(location))


class JobOutput:
    """What a job writes, through a :class:`Folder`. ``location`` is the folder as given."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self.location = folder.location

    def where(self, name: str) -> str:
        return self.folder.where(name)

    def create(self) -> None:
        """Make sure the folder can take a job (a local folder is made; a bucket must exist)."""
        self.folder.create()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive use of the folder by this job (a second job fails at once, clearly)."""
        return self.folder.lock()

    def prepare(self, identity: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
        """Make the folder ready for the job ``identity`` describes; return the existing manifest
        when the job resumes there. Must be called with :meth:`lock` held.

        Refuses a folder made by a different job (other inputs, model, shard size or top-k) and a
        non-empty folder that holds no job, unless ``overwrite``, which deletes the job's files.
        """
        names = []
        for name in self.folder.names():
            if name == FRAGMENTS or (name.startswith(".") and name.endswith(".tmp")):
                self.folder.remove(name)  # left by a killed job; the lock says none is running
            else:
                names.append(name)
        if overwrite:
            for name in names:
                if is_job_file(name) and name != LOCK:
                    self.folder.remove(name)
            return None
        if MANIFEST in names:
            raw = self.folder.read_many([MANIFEST]).get(MANIFEST)
            try:
                existing: dict[str, Any] = json.loads(raw if raw is not None else b"")
            except ValueError as e:
                raise OutputError(
                    f"{self.where(MANIFEST)} is unreadable ({e}); pass --overwrite to start over"
                ) from None
            differences = [k for k, v in identity.items() if existing.get("job", {}).get(k) != v]
            if differences:
                raise OutputError(
                    f"{self.location} holds embeddings of a different job ({', '.join(differences)} differ); "
                    "a job resumes only with the same inputs, model, --shard-size and --top-k. "
                    "Pass --overwrite to start over, or choose another --output folder"
                )
            return existing
        others = sorted(n for n in names if n != LOCK)
        if others:
            shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise OutputError(
                f"{self.location} is not empty ({shown}) and holds no embedding job; choose an empty or new folder "
                "(--overwrite deletes only part-*.parquet and _* files a job writes)"
            )
        return None

    def finished(self, shards: Sequence[int]) -> dict[int, ShardRecord]:
        """The records of the shards of ``shards`` whose Parquet file and record both exist (a
        damaged record counts as missing: that shard is computed again)."""
        parts = set(self.folder.names())
        records = set(self.folder.names(SHARD_RECORDS))
        candidates = [s for s in shards if shard_name(s) in parts and record_name(s).split("/", 1)[1] in records]
        found = self.folder.read_many([record_name(s) for s in candidates])
        done = {}
        for s in candidates:
            with contextlib.suppress(ValueError, TypeError):
                done[s] = ShardRecord(**json.loads(found[record_name(s)]))
        return done

    def write_shard(self, record: ShardRecord, table: pa.Table) -> None:
        """Write one finished shard: its record, then its Parquet file, each whole. Should the
        Parquet file fail (a full disk), the record goes too: that frees room to mark the job
        failed, and a resumed run needs both anyway."""
        self.folder.write(record_name(record.shard), record.to_json())
        try:
            self.folder.write_table(shard_name(record.shard), table)
        except OutputError:
            with contextlib.suppress(OutputError):
                self.folder.remove(record_name(record.shard))
            raise

    def merge_errors(self, records: Sequence[ShardRecord]) -> int:
        """Write ``_errors.jsonl`` from the shard records, in input order; returns the error count."""
        lines = [json.dumps(e) for r in sorted(records, key=lambda r: r.shard) for e in r.errors]
        self.folder.write(ERRORS, ("\n".join(lines) + "\n" if lines else "").encode())
        return len(lines)

    def write_manifest(self, doc: dict[str, Any]) -> None:
        self.folder.write(MANIFEST, json.dumps(doc, indent=2, default=str).encode())

    # -- pieces of shards the Ray engine's write tasks could not write whole ------------------------

    def write_fragment(self, shard: int, table: pa.Table) -> None:
        """Part of a shard, kept until the driver has every part (never seen by dataset readers)."""
        self.folder.write_table(
            f"{FRAGMENTS}/{shard_name(shard)[: -len('.parquet')]}.{uuid.uuid4().hex}.parquet", table
        )

    def fragments(self) -> dict[int, list[pa.Table]]:
        """The pieces in ``_fragments/``, by shard."""
        names = [n for n in self.folder.names(FRAGMENTS) if n.startswith("part-") and n.endswith(".parquet")]
        found = self.folder.read_many([f"{FRAGMENTS}/{n}" for n in names])
        pieces: dict[int, list[pa.Table]] = {}
        for name, data in sorted(found.items()):
            pieces.setdefault(int(name.split("/")[-1][5:10]), []).append(pq.read_table(io.BytesIO(data)))
        return pieces

    def clear_fragments(self) -> None:
        self.folder.remove(FRAGMENTS)

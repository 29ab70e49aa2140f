"""One job at a time on an object-store output: a lock object created only if absent.

The lock is ``_lock`` under the output prefix, written with the store's conditional write
(``If-None-Match: *``, AWS S3 since 2024, MinIO, and moto): of two jobs that start together,
exactly one creates it. It names its holder (host, boot, process, start time) and the holder
rewrites it every :data:`LOCK_REFRESH_S` seconds (``If-Match`` its own version), so a lock whose
holder is gone can be recognised: at once when the holder ran on this machine and its process is
dead, else once it has not been refreshed for :data:`LOCK_STALE_S` seconds (measured by the
store's clock). Such a lock is taken over by a conditional rewrite, so two jobs cannot both take
it over. The holder deletes it when the job ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from models.files import pid_alive
from models.storage import bucket_of, describe, store_errors

from .output import OutputError

log = logging.getLogger(__name__)

LOCK_REFRESH_S = 30.0
LOCK_STALE_S = 120.0  # four refreshes missed: the holder is gone (or cut off from the store)

_held: set[str] = set()  # tokens of the locks this process holds


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


class _Lease:
    """The lock object as this job holds it: its key and its current version (ETag)."""

    def __init__(self, fs: Any, url: str, path: str, body: bytes, etag: str) -> None:
        self.fs, self.url, self.path, self.body, self.etag = fs, url, path, body, etag
        self.stop = threading.Event()

    def refresh_until_stopped(self, every_s: float) -> None:
        while not self.stop.wait(every_s):
            try:
                self.etag = self.fs.pipe_file(self.path, self.body, IfMatch=self.etag)["ETag"]
            except store_errors() as e:
                log.error("could not refresh the job lock %s (%s)", self.url, describe(e, self.url, "write"))
                if isinstance(e, OSError) and "pre-condition" in str(e).lower():
                    return  # another job took it over: it believes this one gone

    def release(self) -> None:
        key = self.path.split("/", 1)[1]
        with contextlib.suppress(*store_errors()):
            self.fs.call_s3("delete_object", Bucket=bucket_of(self.url), Key=key, IfMatch=self.etag)


@contextlib.contextmanager
def bucket_lock(fs: Any, url: str, *, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the lock object ``url`` (``s3://bucket/prefix/_lock``) while the block runs; raise
    :class:`embed.output.OutputError` naming the holder when another job holds it."""
    path = url.split("://", 1)[1]
    holder = _holder()
    me = json.dumps(holder).encode()
    lease = _Lease(fs, url, path, me, _acquire(fs, url, path, me, stale_s))
    _held.add(holder["token"])
    refresher = threading.Thread(
        target=lease.refresh_until_stopped, args=(LOCK_REFRESH_S,), daemon=True, name="job-lock"
    )
    refresher.start()
    try:
        yield
    finally:
        lease.stop.set()
        refresher.join()
        lease.release()
        _held.discard(holder["token"])


def _acquire(fs: Any, url: str, path: str, body: bytes, stale_s: float) -> str:
    """The ETag of the lock object once this job holds it."""
    try:
        return str(fs.pipe_file(path, body, mode="create")["ETag"])
    except FileExistsError:
        pass
    except store_errors() as e:
        raise OutputError(describe(e, url, "create the job lock")) from None
    holder, etag, age = _current(fs, url, path)
    if _is_gone(holder, age, stale_s):
        try:
            taken = str(fs.pipe_file(path, body, IfMatch=etag)["ETag"])
        except store_errors():
            pass  # another job took it over first
        else:
            log.warning(
                "took over the lock of an embedding job that is gone (host %s, pid %s, last refreshed %.0f s ago)",
                holder.get("host", "?"),
                holder.get("pid", "?"),
                age,
            )
            return taken
    raise OutputError(
        f"another embedding job (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('started_at', '?')}) is writing to {url.rsplit('/', 1)[0]}; wait for it or choose another "
        f"--output (a lock not refreshed for {stale_s:.0f} s is taken over)"
    )


def _current(fs: Any, url: str, path: str) -> tuple[dict[str, Any], str, float]:
    """The holder the lock object names, its ETag, and its age by the store's clock."""
    bucket, key = path.split("/", 1)
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        raw = fs.cat_file(path)
    except store_errors() as e:
        raise OutputError(describe(e, url, "read the job lock")) from None
    try:
        holder = json.loads(raw)
        holder = holder if isinstance(holder, dict) else {}
    except ValueError:
        holder = {}
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.now(UTC)
    return holder, str(head["ETag"]), max(0.0, (now - head["LastModified"]).total_seconds())


def _is_gone(holder: dict[str, Any], age: float, stale_s: float) -> bool:
    if age >= stale_s:
        return True
    here = holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id()
    pid = holder.get("pid")
    if not here or not isinstance(pid, int):
        return False
    if pid == os.getpid():  # this process, or one before it with the same pid (a restarted container)
        return holder.get("token") not in _held
    return not pid_alive(pid)

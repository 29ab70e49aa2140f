"""Reading the images' bytes for the decoders (local engine workers, Ray actors), ahead of them.

Objects are read with Arrow's S3 file system (:func:`models.storage.read_object`): a read takes much
less CPU than one through botocore and holds no Python lock while it waits, so reads overlap
decoding in the same process. It asks for the object's size first (two requests per image).
Each process makes its own reading threads.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from models.errors import BackbonesError
from models.storage import arrow_fs, is_url, read_object

READ_AHEAD = 16  # objects read at once for one decoding thread or process, ahead of the one it decodes

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}  # this process's reading threads (a forked child makes its own)


def _pool() -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="object-reads")
        return pool


def warm_up(url: str | None) -> None:
    """Make this process's reader for ``url``'s bucket now, so that a worker pays for it while
    starting rather than on its first images (failures are reported where the reads fail)."""
    if url is not None:
        with contextlib.suppress(BackbonesError):
            arrow_fs(url)
            _pool()


def read_ahead(paths: Sequence[str]) -> Iterator[Callable[[], Any]]:
    """One call per path, in order, returning what the image loader reads: a local path as it
    is, an object's bytes. The first :data:`READ_AHEAD` objects are requested at once (before the
    first call), the next ones as the caller moves on. A missing or forbidden object raises
    :class:`models.errors.ImageError` (that image fails); any other failure of the store raises
    :class:`models.storage.StorageError` (the job stops)."""
    pending: deque[tuple[str, Future[bytes] | None]] = deque()
    upcoming = iter(paths)

    def fill() -> None:
        while len(pending) < READ_AHEAD:
            nxt = next(upcoming, None)
            if nxt is None:
                return
            pending.append((nxt, _pool().submit(read_object, nxt) if is_url(nxt) else None))

    fill()
    return _in_order(pending, fill)


def _in_order(
    pending: deque[tuple[str, Future[bytes] | None]], fill: Callable[[], None]
) -> Iterator[Callable[[], Any]]:
    while pending:
        path, future = pending.popleft()
        fill()
        yield functools.partial(_result, path, future)


def _result(path: str, future: Future[bytes] | None) -> Any:
    return path if future is None else future.result()  # a local path: the loader opens it

"""Reading the images' bytes for the decoders (local engine workers, Ray actors), ahead of them.

Objects are read with Arrow's S3 file system (:func:`embed.storage.arrow_fs`): a read takes much
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

from models.errors import BackbonesError, ImageError

from .storage import StorageError, arrow_error, arrow_fs, is_url

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
    :class:`embed.storage.StorageError` (the job stops)."""
    pending: deque[tuple[str, Future[bytes] | None]] = deque()
    upcoming = iter(paths)

    def fill() -> None:
        while len(pending) < READ_AHEAD:
            nxt = next(upcoming, None)
            if nxt is None:
                return
            pending.append((nxt, _pool().submit(_read, nxt) if is_url(nxt) else None))

    fill()
    return _in_order(pending, fill)


def _in_order(
    pending: deque[tuple[str, Future[bytes] | None]], fill: Callable[[], None]
) -> Iterator[Callable[[], Any]]:
    while pending:
        path, future = pending.popleft()
        fill()
        yield functools.partial(_result, path, future)


def _read(url: str) -> bytes:
    with arrow_fs(url).open_input_stream(url.split("://", 1)[1]) as f:
        return f.readall()  # type: ignore[no-any-return]


def _result(path: str, future: Future[bytes] | None) -> Any:
    if future is None:  # a local path: the loader opens it
        return path
    try:
        return future.result()
    except BackbonesError:
        raise
    except FileNotFoundError:
        raise ImageError(f"no such object: {path}", kind="undecodable") from None
    except OSError as e:
        if "ACCESS_DENIED" in str(e) or isinstance(e, PermissionError):
            raise ImageError(f"access denied: {path}", kind="unreadable") from None
        if "Not a regular file" in str(e):
            raise ImageError(f"not an object: {path}", kind="undecodable") from None
        raise StorageError(f"cannot read {path}: {arrow_error(e)}") from None

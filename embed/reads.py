"""Reading the images' bytes for the decoders (local engine workers, Ray actors), ahead of them.

Objects are read with Arrow's S3 file system (the AWS C++ SDK, the file system Ray Data uses for
``s3://``): a read takes much less CPU than one through botocore and holds no Python lock while
it waits, so reads overlap decoding in the same process. It asks for the object's size first
(two requests per image). It takes credentials, ``AWS_ENDPOINT_URL`` and the region from the
same standard places as the rest of the job. Each process makes its own file system per bucket
and its own reading threads.
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

from .storage import StorageError, bucket_of, is_url

READ_AHEAD = 16  # objects read at once for one decoding thread or process, ahead of the one it decodes

_lock = threading.Lock()
_state: dict[str, Any] = {}  # this process's: "pid", "pool", and a file system per bucket


def _process_state() -> dict[str, Any]:
    if _state.get("pid") != os.getpid():  # a forked child makes its own
        _state.clear()
        _state["pid"] = os.getpid()
    return _state


def _pool() -> ThreadPoolExecutor:
    with _lock:
        state = _process_state()
        if "pool" not in state:
            state["pool"] = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="object-reads")
        return state["pool"]  # type: ignore[no-any-return]


def _bucket_fs(url: str) -> Any:
    """Arrow's S3 file system for ``url``'s bucket (from the URI: it honours AWS_ENDPOINT_URL and
    finds the bucket's region)."""
    bucket = bucket_of(url)
    with _lock:
        state = _process_state()
        fs = state.get(f"s3://{bucket}")
        if fs is None:
            import pyarrow.fs as pafs

            try:
                fs = state[f"s3://{bucket}"] = pafs.FileSystem.from_uri(f"s3://{bucket}")[0]
            except (OSError, ValueError) as e:
                raise StorageError(f"cannot read from s3://{bucket}: {_short(e)}") from None
        return fs


def warm_up(url: str | None) -> None:
    """Make this process's reader for ``url``'s bucket now, so that a worker pays for it while
    starting rather than on its first images (failures are reported where the reads fail)."""
    if url is not None:
        with contextlib.suppress(BackbonesError):
            _bucket_fs(url)
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
    with _bucket_fs(url).open_input_stream(url.split("://", 1)[1]) as f:
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
        raise StorageError(f"cannot read {path}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    """Arrow's message without the key and bucket it repeats."""
    text = " ".join(str(e).split())
    return text.split("': ", 1)[-1] if text.startswith("When ") else text

"""Where the batch job reads and writes: local paths, or objects in an S3-compatible store
(``s3://bucket/key``, through fsspec and s3fs).

Credentials and endpoints come the standard AWS way and are read by botocore itself: the AWS_*
variables (``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible stores, ``AWS_PROFILE``,
``AWS_MAX_ATTEMPTS``...), the shared config files, instance and workload identities. None of it
passes through backbones: a URL that carries credentials (``s3://KEY:SECRET@bucket``) is refused,
and messages name the object and the endpoint, never a key.

Each process (a decode worker, a Ray actor or write task) makes its own file system instance on
first use; fsspec keeps one per process.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import IO, Any
from urllib.parse import urlsplit

from models.errors import BackbonesError, ImageError

SCHEMES = ("s3",)  # object stores the job reads and writes
READ_AHEAD = 16  # objects fetched at once by one decoding thread or process, ahead of the one decoded

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(BackbonesError):
    """An object store that cannot be used: an unknown scheme, no credentials, no answer, no bucket."""


def is_url(location: str) -> bool:
    """True for ``scheme://...`` (an object store), False for a local path."""
    return bool(_URL.match(location))


def check_url(url: str) -> str:
    """``url`` without a trailing slash, once its scheme is known and it names a bucket."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise StorageError(f"unknown scheme {parts.scheme + '://'!r} in {url!r}: use a local path or {known}")
    if _has_credentials(url):
        raise StorageError(
            "credentials in a URL are refused (they would land in logs and manifests): set the AWS "
            "variables or AWS_PROFILE, or use an instance or workload identity"
        )
    if not parts.netloc:
        raise StorageError(f"{url!r} names no bucket: use {parts.scheme}://BUCKET/PREFIX")
    return url.rstrip("/") if parts.path.strip("/") else f"{parts.scheme}://{parts.netloc}"


def _has_credentials(url: str) -> bool:
    """``scheme://USER:SECRET@bucket/...`` (a secret may hold slashes; a bucket name holds no ':')."""
    rest = url.split("://", 1)[1]
    if "@" not in rest:
        return False
    before = rest.split("@", 1)[0]
    colon, slash = before.find(":"), before.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def filesystem(url: str) -> Any:
    """This process's fsspec file system for ``url``'s scheme. Listings are never cached: other
    processes (decode workers, Ray tasks) write beside this one."""
    import fsspec

    return fsspec.filesystem(urlsplit(check_url(url)).scheme.lower(), use_listings_cache=False)


def warm_up(url: str | None) -> None:
    """Import the store's client and make this process's file system for ``url`` (no request),
    so that a worker pays for it while starting rather than on its first images."""
    if url is None:
        return
    with contextlib.suppress(Exception):  # a bad URL or setting is reported where it is used
        filesystem(url).connect()


def first_url(paths: Sequence[str]) -> str | None:
    """The first object URL among ``paths`` (None: all local)."""
    return next((p for p in paths if is_url(p)), None)


def bucket_of(url: str) -> str:
    return urlsplit(url).netloc


def _error_code(e: BaseException) -> str:
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def describe(e: BaseException, url: str, doing: str) -> str:
    """One line for ``e``, raised while ``doing`` ``url`` (botocore's and the store's messages
    name no secret; the endpoint is shown without its path)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return (
            f"cannot {doing} {url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE, or run with an instance or workload identity)"
        )
    if isinstance(e, EndpointConnectionError):
        endpoint = urlsplit(str(e.kwargs.get("endpoint_url", "")))
        return (
            f"cannot {doing} {url}: the object store at {endpoint.scheme}://{endpoint.netloc} does not answer "
            "(check AWS_ENDPOINT_URL and the network)"
        )
    if _error_code(e) == "NoSuchBucket" or "bucket does not exist" in str(e):
        return f"cannot {doing} {url}: there is no bucket {bucket_of(url)!r}"
    if isinstance(e, FileNotFoundError):
        return f"cannot {doing} {url}: no such object or prefix"
    if isinstance(e, PermissionError):
        return f"cannot {doing} {url}: access denied ({_first_line(e)})"
    return f"cannot {doing} {url}: {type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def store_errors() -> tuple[type[BaseException], ...]:
    """What reaching an object store raises: OSError (s3fs's translation of the store's errors)
    and botocore's own (credentials, connections)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)


@contextlib.contextmanager
def reporting(url: str, doing: str, error: type[BackbonesError] = StorageError) -> Iterator[None]:
    """Turn what the store raises inside the block into one clear ``error``."""
    try:
        yield
    except BackbonesError:
        raise
    except store_errors() as e:
        raise error(describe(e, url, doing)) from None


def open_binary(location: str) -> IO[bytes]:
    """A local file or an object, opened for reading."""
    if not is_url(location):
        return open(location, "rb")
    return filesystem(location).open(location, "rb")  # type: ignore[no-any-return]


def read_ahead(paths: Sequence[str]) -> Iterator[Callable[[], Any]]:
    """One call per path, in order, returning what the image loader reads: a local path as it
    is, an object's bytes (fetched :data:`READ_AHEAD` at a time on fsspec's I/O thread, while the
    caller decodes). A missing or forbidden object raises :class:`models.errors.ImageError` (that
    image fails); any other failure of the store raises :class:`StorageError` (the job stops)."""
    pending: deque[tuple[str, Future[bytes] | None]] = deque()
    upcoming = iter(paths)

    def fill() -> None:
        while len(pending) < READ_AHEAD:
            nxt = next(upcoming, None)
            if nxt is None:
                return
            pending.append((nxt, _fetch(nxt) if is_url(nxt) else None))

    fill()
    while pending:
        path, future = pending.popleft()
        fill()
        yield functools.partial(_result, path, future)


def _fetch(url: str) -> Future[bytes]:
    import asyncio

    try:
        fs = filesystem(url)
    except StorageError as e:
        f: Future[bytes] = Future()
        f.set_exception(e)
        return f
    return asyncio.run_coroutine_threadsafe(fs._cat_file(url), fs.loop)


def _result(url: str, future: Future[bytes] | None) -> Any:
    if future is None:  # a local path: the loader opens it
        return url
    try:
        return future.result()
    except BackbonesError:
        raise
    except FileNotFoundError as e:
        if _error_code(e) == "NoSuchBucket" or "bucket does not exist" in str(e):
            raise StorageError(describe(e, url, "read")) from None
        raise ImageError(f"no such object: {url}", kind="undecodable") from None
    except (PermissionError, IsADirectoryError) as e:
        raise ImageError(describe(e, url, "read"), kind="unreadable") from None
    except store_errors() as e:
        raise StorageError(describe(e, url, "read")) from None

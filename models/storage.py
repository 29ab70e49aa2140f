"""Where the batch job and fine-tuning read images (and the job writes its output): local paths,
or objects in an S3-compatible store (``s3://bucket/key``). Listing, reading manifests and
records, deleting and the job lock go through fsspec and s3fs (botocore); the images' bytes
(:func:`read_object`) and the objects a job writes through Arrow's S3 file system (the AWS C++ SDK, which Ray Data uses for ``s3://``
too): it takes a fraction of botocore's CPU per request, holds no Python lock while it waits,
and costs a process no botocore import, so Ray's write tasks start writing at once.

Credentials and endpoints come the standard AWS way and are read by the AWS SDKs themselves: the
AWS_* variables (``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible stores, ``AWS_PROFILE``,
``AWS_MAX_ATTEMPTS``...), the shared config files, instance and workload identities. None of it
passes through backbones: a URL that carries credentials (``s3://KEY:SECRET@bucket``) is refused,
and messages name the object and the endpoint, never a key.

Each process (a decode worker, a Ray actor or write task) makes its own file system instances on
first use: fsspec keeps one per process, :func:`arrow_fs` one per bucket and process.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from .errors import BackbonesError, ImageError

SCHEMES = ("s3",)  # object stores the job reads and writes

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(BackbonesError):
    """An object store that cannot be used: an unknown scheme, no credentials, no answer, no bucket."""


def is_url(location: str) -> bool:
    """True for ``scheme://...`` (an object store), False for a local path."""
    return bool(_URL.match(location))


def check_url(url: str) -> str:
    """``url`` without a trailing slash, once its scheme is known and it names a bucket."""
    if _has_credentials(url):  # first: no message may echo such a URL
        raise StorageError(
            "credentials in a URL are refused (they would land in logs and manifests): set the AWS "
            "variables or AWS_PROFILE, or use an instance or workload identity"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise StorageError(f"unknown scheme {parts.scheme + '://'!r} in {url!r}: use a local path or {known}")
    if not parts.netloc:
        raise StorageError(f"{url!r} names no bucket: use {parts.scheme}://BUCKET/PREFIX")
    return url.rstrip("/") if parts.path.strip("/") else f"{parts.scheme}://{parts.netloc}"


_arrow: dict[tuple[int, str], Any] = {}
_arrow_lock = threading.Lock()


def arrow_fs(url: str) -> Any:
    """Arrow's S3 file system for ``url``'s bucket, made from the bucket's URI: that honours
    ``AWS_ENDPOINT_URL`` and finds the bucket's region. Small objects are written with one
    PutObject (no multipart upload left behind by a killed job)."""
    key = (os.getpid(), bucket_of(url))
    with _arrow_lock:
        fs = _arrow.get(key)
        if fs is None:
            import pyarrow.fs as pafs

            try:
                fs = _arrow[key] = pafs.FileSystem.from_uri(f"s3://{key[1]}?allow_delayed_open=true")[0]
            except (OSError, ValueError) as e:
                raise StorageError(f"cannot reach s3://{key[1]}: {arrow_error(e)}") from None
        return fs


def arrow_error(e: BaseException) -> str:
    """Arrow's message, on one line, without the key and bucket it repeats."""
    text = " ".join(str(e).split())
    return text.split("': ", 1)[-1] if text.startswith("When ") else text


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


def resolve_location(value: str, base: str) -> str:
    """A path in a manifest kept at ``base`` (its folder or prefix): an object URL as it is (once
    checked), an absolute path as it is, a relative path against ``base``."""
    if is_url(value):
        check_url(value)
        return value
    if is_url(base):  # keys have no '..': resolve it here, as a folder would
        parts = urlsplit(base)
        return (
            value
            if value.startswith("/")
            else f"{parts.scheme}://{parts.netloc}{posixpath.normpath(posixpath.join(parts.path or '/', value))}"
        )
    rel = Path(value)
    return str(rel if rel.is_absolute() else Path(base) / rel)


def open_binary(location: str) -> IO[bytes]:
    """A local file or an object, opened for reading."""
    if not is_url(location):
        return open(location, "rb")
    return filesystem(location).open(location, "rb")  # type: ignore[no-any-return]


def read_object(url: str) -> bytes:
    """An object's bytes, read with Arrow's S3 file system. A missing or forbidden object raises
    :class:`models.errors.ImageError` (that image fails); any other failure of the store raises
    :class:`StorageError`."""
    try:
        with arrow_fs(url).open_input_stream(url.split("://", 1)[1]) as f:
            return f.readall()  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise ImageError(f"no such object: {url}", kind="undecodable") from None
    except OSError as e:
        if "ACCESS_DENIED" in str(e) or isinstance(e, PermissionError):
            raise ImageError(f"access denied: {url}", kind="unreadable") from None
        if "Not a regular file" in str(e):
            raise ImageError(f"not an object: {url}", kind="undecodable") from None
        raise StorageError(f"cannot read {url}: {arrow_error(e)}") from None

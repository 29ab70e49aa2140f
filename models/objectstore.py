"""Object storage for the remote registry: plain reads and writes through fsspec, plus the two
conditional writes the registry's guarantees rest on.

- ``create(key, data)``: write only if ``key`` does not exist (S3 ``If-None-Match: *``).
- ``replace(key, data, token)``: write only if ``key`` still holds what was read with ``token``
  (S3 ``If-Match: <etag>``).

S3 (and S3-compatible stores through ``AWS_ENDPOINT_URL``: MinIO, Ceph...) has both; ``file://``
gets them from create-exclusive links and a lock file (so it also works on a shared NFS mount).
Other fsspec stores (``gs://``, ``az://``... when their package is installed) are read and written
plainly: versions still appear only whole, but alias moves, which need compare-and-swap, are
refused there with a one-line error.

Credentials and endpoints come from the standard chain of the store's own library (for S3,
botocore: ``AWS_*`` variables, profiles, instance and workload identity, ``AWS_ENDPOINT_URL``);
a URL carrying credentials is refused, and messages never show more than ``scheme://bucket/prefix``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import RegistryError
from .files import temp_beside, write_atomic

_USERINFO_RE = re.compile(r"//[^/@\s]*@")


@dataclass(frozen=True)
class Entry:
    """One stored object: its key below the registry root, size in bytes, last change (epoch s)."""

    key: str
    size: int
    modified: float


@contextlib.contextmanager
def _closing(callback: Any) -> Iterator[None]:
    try:
        yield
    finally:
        if callback is not None and hasattr(callback, "close"):
            callback.close()


def _store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a store's library raises for a failed request (not our bugs)."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += (BotoCoreError, ClientError)
    return errors


def _hint(error: BaseException) -> str:
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return " (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where a role is attached)"
    return ""


class Store:
    """Objects under one root (``bucket/prefix``), addressed by '/'-joined keys."""

    conditional = False

    def __init__(self, fs: Any, root: str, display: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.display = display

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn the store library's failures into one line naming the registry, never its secrets."""
        try:
            yield
        except RegistryError:
            raise
        except _store_errors() as e:
            reason = _USERINFO_RE.sub("//", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise RegistryError(f"{self.display}: {what} failed: {reason}{_hint(e)}") from None

    # -- plain operations ---------------------------------------------------------------------

    def list(self, prefix: str) -> list[Entry]:
        """Every object below ``prefix`` (recursive, one paged listing on object stores)."""
        with self.errors(f"listing {prefix}"):
            found = self.fs.find(self.path(prefix), detail=True)
        start = len(self.root) + 1
        return [
            Entry(path[start:], int(info.get("size") or 0), _modified(info))
            for path, info in found.items()
            if info.get("type", "file") == "file"
        ]

    def read(self, key: str) -> bytes | None:
        """The object's bytes, ``None`` if there is none."""
        with self.errors(f"reading {key}"):
            try:
                return bytes(self.fs.cat_file(self.path(key)))
            except FileNotFoundError:
                return None

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """Several objects at once (concurrent requests on object stores)."""
        paths = {self.path(k): k for k in keys}
        if not paths:
            return {}
        with self.errors("reading specs"):
            got = self.fs.cat(list(paths), on_error="return")
            for value in got.values():
                if isinstance(value, BaseException) and not isinstance(value, FileNotFoundError):
                    raise value
        return {k: (None if isinstance(got.get(p), BaseException) else got.get(p)) for p, k in paths.items()}

    def write(self, key: str, data: bytes) -> None:
        with self.errors(f"writing {key}"):
            self.fs.pipe_file(self.path(key), data)

    def upload(self, key: str, source: Path, callback: Any = None) -> None:
        """Copy a local file to ``key``; ``callback`` (an fsspec callback) follows it and is closed after."""
        with self.errors(f"uploading {key}"), _closing(callback):
            self.fs.put_file(str(source), self.path(key), **({"callback": callback} if callback is not None else {}))

    def download(self, key: str, target: Path, callback: Any = None) -> None:
        with self.errors(f"downloading {key}"), _closing(callback):
            self.fs.get_file(self.path(key), str(target), **({"callback": callback} if callback is not None else {}))

    def remove(self, keys: Iterable[str]) -> None:
        paths = [self.path(k) for k in keys]
        if paths:
            with self.errors("deleting"):
                self.fs.rm(paths)

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        """Abort unfinished multipart uploads below ``prefix`` begun before ``older_than`` (S3 only)."""
        return 0

    # -- conditional writes -------------------------------------------------------------------

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and a token that ``replace`` checks, ``None`` if there is none."""
        data = self.read(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` unless it exists; False if it does. Here, without conditional writes, a
        check then a write: two writers of the same key at once may both think they created it."""
        with self.errors(f"creating {key}"):
            if self.fs.exists(self.path(key)):
                return False
            self.fs.pipe_file(self.path(key), data)
            return True

    def replace(self, key: str, data: bytes, token: str) -> bool:
        """Write ``key`` only if it still holds what ``read_versioned`` returned with ``token``."""
        require_conditional(self)
        return False


class S3Store(Store):
    """S3 and S3-compatible stores through s3fs."""

    conditional = True

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, _, name = self.path(key).partition("/")
        return bucket, name

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        # s3fs reads content and ETag in two requests; one GET returns both, consistent with each
        # other, so this calls the S3 API through s3fs's own client.
        from fsspec.asyn import sync

        bucket, name = self._bucket_key(key)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=name)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        with self.errors(f"reading {key}"):
            try:
                data, etag = sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        return bytes(data), str(etag)

    def create(self, key: str, data: bytes) -> bool:
        with self.errors(f"creating {key}"):
            try:
                self.fs.pipe_file(self.path(key), data, mode="create")  # If-None-Match: *
            except FileExistsError:
                return False
            except OSError as e:
                if _precondition_failed(e):  # a concurrent create of the same key (409 on AWS)
                    return False
                raise
        return True

    def replace(self, key: str, data: bytes, token: str) -> bool:
        # s3fs has no replace-if-unchanged; put_object's IfMatch through its own client is S3's.
        bucket, name = self._bucket_key(key)
        with self.errors(f"writing {key}"):
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=data, IfMatch=token)
            except OSError as e:
                if _precondition_failed(e):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(self.path(key))
        return True

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        bucket, name = self._bucket_key(prefix)
        with self.errors(f"listing unfinished uploads below {prefix}"):
            found = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=name).get("Uploads", [])
            stale = [u for u in found if u["Initiated"].timestamp() < older_than]
            for u in stale:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        return len(stale)


def require_conditional(store: Store) -> None:
    """Refuse what needs compare-and-swap on a store without conditional writes."""
    if not store.conditional:
        raise RegistryError(
            f"{store.display}: this store offers no conditional writes through its fsspec package, so alias "
            "moves cannot be made safe against concurrent moves; keep aliases in an s3:// (or S3-compatible) "
            "or file:// registry"
        )


def _precondition_failed(error: BaseException) -> bool:
    """A 412 (the condition did not hold) or AWS's 409 ConditionalRequestConflict (another
    conditional write to the key was in flight): either way, someone else wrote first."""
    response = getattr(error.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status == 412


class LocalStore(Store):
    """A folder (``file:///path``), also on a shared mount: create-exclusive hard links and a lock
    file give it the same conditional writes as S3; the token is the content's sha256."""

    conditional = True

    def create(self, key: str, data: bytes) -> bool:
        target = Path(self.path(key))
        with self.errors(f"creating {key}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_beside(target)
            try:
                tmp.write_bytes(data)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.link(tmp, target)  # fails if target exists; the content appears whole
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)

    def replace(self, key: str, data: bytes, token: str) -> bool:
        target = Path(self.path(key))
        with self.errors(f"writing {key}"), open(target.parent / f".{target.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = target.read_bytes() if target.is_file() else None
                if current is None or hashlib.sha256(current).hexdigest() != token:
                    return False
                write_atomic(target, data)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def list(self, prefix: str) -> list[Entry]:
        # hidden files are this store's temporary and lock files
        return [e for e in super().list(prefix) if not e.key.rpartition("/")[2].startswith(".")]


def _modified(info: dict[str, Any]) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return float(stamp) if isinstance(stamp, int | float) else time.time()


def _quiet_request_logs() -> None:
    """botocore logs whole requests at DEBUG, session token and signature included: credentials
    never reach a log line, so its loggers stay at INFO even under ``backbones -vv``."""
    for name in ("botocore", "aiobotocore"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))


def public_url(url: str) -> str:
    """``url`` as it may appear in messages and logs (no user information)."""
    return _USERINFO_RE.sub("//", url)


def open_store(url: str) -> Store:
    """The store a registry URL names: ``s3://bucket[/prefix]``, ``file:///path`` or another fsspec
    URL whose package is installed. Nothing is requested from the store here."""
    import fsspec

    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise RegistryError(
            f"registry URL {public_url(url)!r} has no scheme: use s3://bucket/prefix, file:///path, or another "
            "fsspec URL (gs://, az://) whose package is installed"
        )
    if "@" in rest.partition("/")[0]:
        raise RegistryError(
            "the registry URL carries credentials (user@ or key:secret@); keep them in the AWS environment "
            "variables, a profile or a role, never in a URL"
        )
    if "?" in rest or "#" in rest:
        raise RegistryError(f"registry URL {public_url(url)!r}: no query or fragment, only scheme://bucket/prefix")
    display = url.rstrip("/")
    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme in ("s3", "s3a"):
        options["use_listings_cache"] = False  # other machines change the bucket
    elif scheme == "file":
        options = {"auto_mkdir": True}
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise RegistryError(f"registry URL {display}: {e}") from None
    except ValueError:
        raise RegistryError(
            f"registry URL {display}: unknown scheme {scheme!r}; use s3://bucket/prefix, file:///path, or "
            "another fsspec protocol whose package is installed"
        ) from None
    except OSError as e:  # protocols that connect when opened (ftp, sftp, ...): unreachable
        raise RegistryError(f"registry URL {display}: cannot connect ({type(e).__name__}: {e})") from None
    if scheme in ("s3", "s3a"):
        _quiet_request_logs()
        if not root.strip("/"):
            raise RegistryError(f"registry URL {display} names no bucket: use s3://bucket or s3://bucket/prefix")
        return S3Store(fs, root, display)
    if scheme == "file":
        if not Path(root).is_dir():
            raise RegistryError(f"registry folder {root} does not exist: create it first (like a bucket)")
        return LocalStore(fs, root, display)
    return Store(fs, root, display)

"""Labelled images in object storage (``s3://bucket/prefix``): listing an ImageFolder prefix, asking
the store about the objects a manifest names, and the key each object is cached under.

No object is read to scan a set. An object's key is a sha256 over the checksum its store gives in
the listing (or a HEAD request): the ETag and the size, or the version id where a store gives no
ETag. So a re-run on unchanged objects finds every feature in the cache without downloading an
image, and an overwritten object (a new ETag) is a miss. An ETag that is the MD5 of the content
(an object uploaded in one part) makes two copies of a photo one key, as two copies of a file are
one sha256 on disk. The format of an object is told by its name; what does not decode is found
when the images are first decoded (the feature pass or the readability pass), as on disk.

Listing and HEAD requests go through fsspec and s3fs (:mod:`models.storage`), the images' bytes
through Arrow (:func:`models.storage.read_object`); credentials and endpoints come the standard
AWS way (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...), never from the URL.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from models.errors import BackbonesError
from models.storage import check_url, describe, filesystem, reporting, store_errors

from .errors import DatasetError

# HEAD requests in flight at once for a manifest's objects (they wait on the network, not a core)
HEAD_REQUESTS = 16

ObjectInfo = Mapping[str, Any]


def dataset_url(url: str) -> str:
    """``url`` checked (a known scheme, a bucket, no credentials), without a trailing slash."""
    try:
        return check_url(url)
    except BackbonesError as e:
        raise DatasetError(str(e)) from None


def object_key(url: str, info: ObjectInfo) -> str:
    """The cache key of the object ``url`` described by ``info`` (see the module docstring)."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag:
        basis = f"etag\0{etag}\0size\0{info.get('size')}"
    elif info.get("VersionId"):
        basis = f"version\0{url}\0{info['VersionId']}"
    else:
        raise DatasetError(f"{url}: the store gives no checksum (ETag or version id) to key its features by")
    return hashlib.sha256(basis.encode()).hexdigest()


def inspect_object(url: str, info: ObjectInfo | str) -> tuple[str, str] | str:
    """``(key, format)`` of an object, or the reason it cannot be an image (``info`` may be that
    reason already: the HEAD request failed)."""
    if isinstance(info, str):
        return info
    if int(info.get("size") or 0) == 0:
        return "empty file (0 bytes)"
    return object_key(url, info), format_by_name(url)


def format_by_name(name: str) -> str:
    """The image format Pillow registers for ``name``'s suffix ("unknown" for none)."""
    from PIL import Image

    return Image.registered_extensions().get(posixpath.splitext(name)[1].lower(), "unknown")


def list_prefix(url: str) -> dict[str, ObjectInfo]:
    """Every object under the prefix ``url`` (recursively), by its key relative to the prefix.

    Raises :class:`DatasetError` for a bucket that does not exist, a prefix that holds nothing,
    an object given where a prefix is expected, and a store that cannot be reached."""
    fs = filesystem(url)
    with reporting(url, "list", DatasetError):
        found = fs.find(url, detail=True)
    if not found:
        raise DatasetError(f"no such dataset: {url} (nothing is stored under this prefix)")
    start = len(url.split("://", 1)[1].rstrip("/")) + 1  # fsspec names objects without the scheme
    listed = {name[start:]: info for name, info in found.items() if len(name) >= start}
    if not listed:  # the URL names one object, not a prefix
        raise DatasetError(
            f"{url} is an object, not a prefix: pass an ImageFolder prefix (one sub-prefix per class) "
            "or a CSV manifest (.csv with rows 'path,label')"
        )
    return listed


def head_objects(urls: Sequence[str]) -> dict[str, ObjectInfo | str]:
    """What the store says about each object: its listing entry, or why it cannot be used
    ("no such object", "access denied"). A store that fails as a whole raises :class:`DatasetError`."""

    def head(url: str) -> ObjectInfo | str:
        try:
            return filesystem(url).info(url)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return "no such object"
        except PermissionError:
            return "access denied"
        except store_errors() as e:
            raise DatasetError(describe(e, url, "read")) from None

    if not urls:
        return {}
    with ThreadPoolExecutor(min(HEAD_REQUESTS, len(urls))) as pool:
        return dict(zip(urls, pool.map(head, urls), strict=True))


def read_manifest_object(url: str) -> str:
    """The text of a CSV manifest stored as an object."""
    with reporting(url, "read the manifest", DatasetError):
        data = filesystem(url).cat_file(url)
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"cannot read the manifest {url}: {e}") from None

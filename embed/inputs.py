"""What a batch embedding job reads: files, folders (recursive), globs and manifests, expanded
into one ordered list of ``(id, path)`` items. Each may be local or in an object store
(``s3://bucket/prefix``: a prefix is listed recursively, like a folder), and a manifest's paths
may be object URLs.

Order is deterministic: inputs in the order given; within a folder, a prefix or a glob, sorted
paths; within a manifest, its row order. The default id is the path as given (files, folder and
glob matches, objects as ``s3://bucket/key``) or as resolved (a manifest's relative paths resolve
against the manifest's folder or prefix).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from models.errors import BackbonesError
from models.imaging import IMAGE_SUFFIXES, image_paths
from models.storage import (
    StorageError,
    check_url,
    describe,
    filesystem,
    is_url,
    open_binary,
    reporting,
    resolve_location,
)

log = logging.getLogger(__name__)

CSV_SUFFIXES = frozenset({".csv"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
MANIFEST_SUFFIXES = CSV_SUFFIXES | PARQUET_SUFFIXES | JSONL_SUFFIXES


class InputError(BackbonesError):
    """An input that names nothing: a missing file or folder, a glob that matches nothing."""


class ManifestError(BackbonesError):
    """A manifest that cannot be used: unreadable, no path column, an empty path."""


@dataclass(frozen=True)
class Item:
    """One image to embed: its id in the output and the path it is read from."""

    id: str
    path: str


def collect_inputs(inputs: Sequence[str], *, path_column: str = "path", id_column: str = "id") -> list[Item]:
    """Expand ``inputs`` (files, folders, globs, manifests) into items, in a deterministic order.

    A file whose suffix is .csv, .parquet/.pq or .jsonl/.ndjson is a manifest; any other file is
    an image. Raises :class:`InputError` for an input that names nothing and when there are no
    items at all, :class:`ManifestError` for a manifest that cannot be read.
    """
    items: list[Item] = []
    for raw in inputs:
        items.extend(_expand(raw, path_column, id_column))
    if not items:
        raise InputError(f"no images found in {', '.join(repr(i) for i in inputs)}")
    duplicates = len(items) - len({it.id for it in items})
    if duplicates:
        log.warning(
            "%d duplicate id(s) among the inputs; give the manifest an id column to tell them apart", duplicates
        )
    return items


def _expand(raw: str, path_column: str, id_column: str) -> Iterator[Item]:
    if is_url(raw):
        yield from _expand_url(raw, path_column, id_column)
        return
    path = Path(raw)
    if path.is_dir():
        found = [str(p) for p in image_paths([raw])]
        if not found:
            log.warning("folder %s holds no image files", raw)
        yield from (Item(p, p) for p in found)
    elif path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            yield from read_manifest(path, path_column=path_column, id_column=id_column)
        else:
            yield Item(raw, raw)
    elif glob.has_magic(raw):
        matches = sorted(glob.glob(raw, recursive=True))
        if not matches:
            raise InputError(
                f"the pattern {raw!r} matches no files (quote it so that the shell leaves it to backbones)"
            )
        for m in matches:
            if Path(m).is_dir():
                yield from (Item(str(p), str(p)) for p in image_paths([m]))
            else:
                yield Item(m, m)
    else:
        raise InputError(f"no such file, folder or manifest: {raw}")


def _expand_url(raw: str, path_column: str, id_column: str) -> Iterator[Item]:
    """An object (an image or a manifest), a prefix listed recursively, or a glob over objects."""
    url = check_url(raw)
    fs = filesystem(url)
    with reporting(url, "list", InputError):
        try:
            if glob.has_magic(url):
                matches = fs.glob(url, detail=True)
                if not matches:
                    raise InputError(f"the pattern {raw!r} matches no objects")
                for key in sorted(matches):
                    if matches[key]["type"] == "directory":
                        yield from _images_under(fs, key)
                    else:
                        yield Item(fs.unstrip_protocol(key), fs.unstrip_protocol(key))
                return
            kind = fs.info(url)["type"]
            if kind == "directory":
                yield from _images_under(fs, url)
                return
        except FileNotFoundError as e:
            message = describe(e, url, "list")
            raise InputError(
                message if "no bucket" in message else f"no such file, folder or manifest: {url}"
            ) from None
    if posixpath.splitext(url)[1].lower() in MANIFEST_SUFFIXES:
        yield from read_manifest(url, path_column=path_column, id_column=id_column)
    else:
        yield Item(url, url)


def _images_under(fs: Any, prefix: str) -> list[Item]:
    """The image objects under ``prefix`` (recursively, by suffix), sorted, as URLs."""
    urls = sorted(fs.unstrip_protocol(k) for k in fs.find(prefix))
    images = [u for u in urls if posixpath.splitext(u)[1].lower() in IMAGE_SUFFIXES]
    if not images:
        log.warning("prefix %s holds no image files", fs.unstrip_protocol(prefix))
    return [Item(u, u) for u in images]


def _resolve(value: str, base: str, manifest: str, where: str) -> str:
    """A manifest's path: a URL as it is, a relative path against the manifest's folder or prefix."""
    try:
        return resolve_location(value, base)
    except StorageError as e:
        raise ManifestError(f"{manifest}: {where}: {e}") from None


def read_manifest(manifest: Path | str, *, path_column: str = "path", id_column: str = "id") -> list[Item]:
    """The items a CSV, Parquet or JSON-lines manifest lists, in row order.

    ``path_column`` is required; ``id_column`` is optional (missing or empty: the resolved path).
    Relative paths resolve against the manifest's folder (or prefix, for a manifest in an object
    store); object URLs are kept as they are.
    """
    name = str(manifest)
    suffix = posixpath.splitext(name)[1].lower()
    data = _fetch(name) if is_url(name) else None
    if suffix in CSV_SUFFIXES:
        rows = _csv_rows(manifest, path_column, data)
    elif suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(manifest, path_column, id_column, data)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(manifest, path_column, data)
    else:
        raise ManifestError(f"{manifest}: unknown manifest type; use .csv, .parquet or .jsonl")
    base = name.rsplit("/", 1)[0] if is_url(name) else str(Path(name).parent)
    items = []
    for where, row in rows:
        value = row.get(path_column)
        if value is None or str(value).strip() == "":
            raise ManifestError(f"{manifest}: {where} has no {path_column!r} value; every row needs a path")
        resolved = _resolve(str(value).strip(), base, name, where)
        ident = row.get(id_column)
        items.append(Item(resolved if ident is None or str(ident) == "" else str(ident), resolved))
    if not items:
        log.warning("manifest %s lists no images", manifest)
    return items


def _fetch(url: str) -> bytes:
    """A manifest object's bytes (read whole: the readers below need a seekable file)."""
    with reporting(url, "read the manifest", ManifestError), open_binary(url) as f:
        return f.read()


def _text(manifest: Path | str, data: bytes | None, encoding: str) -> IO[str]:
    if data is None:
        return open(manifest, newline="", encoding=encoding)
    return io.TextIOWrapper(io.BytesIO(data), newline="", encoding=encoding)


def _missing_column(manifest: Path | str, path_column: str, columns: Sequence[str]) -> ManifestError:
    return ManifestError(
        f"{manifest} has no {path_column!r} column (columns: {', '.join(columns) or 'none'}); "
        f"a manifest needs a {path_column!r} column and optionally an 'id' column"
    )


def _csv_rows(manifest: Path | str, path_column: str, data: bytes | None) -> list[tuple[str, dict[str, Any]]]:
    try:
        with _text(manifest, data, "utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if path_column not in columns:
                raise _missing_column(manifest, path_column, columns)
            # DictReader's line_num counts physical lines; the header is line 1
            return [(f"line {reader.line_num}", dict(row)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{manifest}: cannot read the CSV manifest ({e})") from None


def _parquet_rows(
    manifest: Path | str, path_column: str, id_column: str, data: bytes | None
) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def source() -> Any:
        return manifest if data is None else pa.BufferReader(data)

    try:
        schema = pq.read_schema(source())
        if path_column not in schema.names:
            raise _missing_column(manifest, path_column, schema.names)
        columns = [path_column] + ([id_column] if id_column in schema.names else [])
        table = pq.read_table(source(), columns=columns)
        # ids may be integers in Parquet; the output's id column is always a string
        table = table.cast(pa.schema([pa.field(c, pa.string()) for c in columns]))
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{manifest}: cannot read the Parquet manifest ({e})") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _jsonl_rows(manifest: Path | str, path_column: str, data: bytes | None) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        with _text(manifest, data, "utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ManifestError(f"{manifest}: line {n} is not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise ManifestError(f"{manifest}: line {n} is not a JSON object")
                if path_column not in obj:
                    raise ManifestError(
                        f"{manifest}: line {n} has no {path_column!r} key (keys: {', '.join(obj) or 'none'}); "
                        f"every line needs a {path_column!r} and optionally an 'id'"
                    )
                rows.append((f"line {n}", obj))
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{manifest}: cannot read the JSON-lines manifest ({e})") from None
    return rows

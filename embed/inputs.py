"""What a batch embedding job reads: files, folders (recursive), globs and manifests, expanded
into one ordered list of ``(id, path)`` items.

Order is deterministic: inputs in the order given; within a folder or a glob, sorted paths;
within a manifest, its row order. The default id is the path as given (files, folder and glob
matches) or as resolved (a manifest's relative paths resolve against the manifest's folder).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import BackbonesError
from models.imaging import image_paths

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


def read_manifest(manifest: Path, *, path_column: str = "path", id_column: str = "id") -> list[Item]:
    """The items a CSV, Parquet or JSON-lines manifest lists, in row order.

    ``path_column`` is required; ``id_column`` is optional (missing or empty: the resolved path).
    Relative paths resolve against the manifest's folder.
    """
    suffix = manifest.suffix.lower()
    if suffix in CSV_SUFFIXES:
        rows = _csv_rows(manifest, path_column)
    elif suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(manifest, path_column, id_column)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(manifest, path_column)
    else:
        raise ManifestError(f"{manifest}: unknown manifest type; use .csv, .parquet or .jsonl")
    base = manifest.parent
    items = []
    for where, row in rows:
        value = row.get(path_column)
        if value is None or str(value).strip() == "":
            raise ManifestError(f"{manifest}: {where} has no {path_column!r} value; every row needs a path")
        rel = Path(str(value).strip())
        resolved = str(rel if rel.is_absolute() else base / rel)
        ident = row.get(id_column)
        items.append(Item(resolved if ident is None or str(ident) == "" else str(ident), resolved))
    if not items:
        log.warning("manifest %s lists no images", manifest)
    return items


def _missing_column(manifest: Path, path_column: str, columns: Sequence[str]) -> ManifestError:
    return ManifestError(
        f"{manifest} has no {path_column!r} column (columns: {', '.join(columns) or 'none'}); "
        f"a manifest needs a {path_column!r} column and optionally an 'id' column"
    )


def _csv_rows(manifest: Path, path_column: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if path_column not in columns:
                raise _missing_column(manifest, path_column, columns)
            # DictReader's line_num counts physical lines; the header is line 1
            return [(f"line {reader.line_num}", dict(row)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{manifest}: cannot read the CSV manifest ({e})") from None


def _parquet_rows(manifest: Path, path_column: str, id_column: str) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(manifest)
        if path_column not in schema.names:
            raise _missing_column(manifest, path_column, schema.names)
        columns = [path_column] + ([id_column] if id_column in schema.names else [])
        table = pq.read_table(manifest, columns=columns)
        # ids may be integers in Parquet; the output's id column is always a string
        table = table.cast(pa.schema([pa.field(c, pa.string()) for c in columns]))
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{manifest}: cannot read the Parquet manifest ({e})") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _jsonl_rows(manifest: Path, path_column: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        with open(manifest, encoding="utf-8") as f:
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

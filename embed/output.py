"""The output folder of a batch embedding job: Parquet shards, their records, the job manifest.

Layout (readers such as Arrow, pandas, Spark and DuckDB skip names starting with ``_`` or ``.``,
the Hadoop convention of ``_SUCCESS`` and ``_metadata``, so the folder reads as one dataset)::

    part-00000.parquet ...   id, path, embedding[, predictions]
    _manifest.json           model, spec checksum, preprocessing, dim, plan fingerprint, counts, versions
    _errors.jsonl            unreadable inputs: id, path, error, kind (merged from the shard records)
    _shards/part-00000.json  one record per finished shard: its rows, errors and timings
    _lock                    held (flock) while a job writes here
    _fragments/              (Ray engine, rarely) pieces of a shard, joined when the run ends

A shard is finished when both its Parquet file and its record exist. Both are written to a
temporary name and renamed into place, the record first, so that a job killed at any moment
leaves whole shards or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.errors import BackbonesError
from models.files import replacing, write_atomic
from models.inference import softmax

MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
SHARD_RECORDS = "_shards"
FRAGMENTS = "_fragments"  # pieces of shards that Ray split across write tasks (see embed.ray_engine)
LOCK = "_lock"
FORMAT = "backbones.embeddings/1"


class OutputError(BackbonesError):
    """The output folder cannot take this job (another job's output, in use, not a folder...)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def prediction_type() -> pa.DataType:
    return pa.list_(pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float32())]))


def output_schema(dim: int, top_k: int | None, metadata: dict[str, str] | None = None) -> pa.Schema:
    """``id``, ``path``, ``embedding`` (fixed-size list of float32) and, with ``top_k``,
    ``predictions`` (best first)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ]
    if top_k:
        fields.append(pa.field("predictions", prediction_type(), nullable=False))
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})


def top_k_arrays(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (int32) and probabilities (float32), shape ``(n, k)``, best first, ranked
    exactly as :func:`models.inference.top_k` ranks them (softmax in float64, stable sort)."""
    probs = softmax(np.atleast_2d(logits))
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(probs, idx, axis=1).astype(np.float32)


def shard_table(
    schema: pa.Schema,
    ids: Sequence[str],
    paths: Sequence[str],
    embeddings: np.ndarray,
    labels: Sequence[str] = (),
    topk_index: np.ndarray | None = None,
    topk_score: np.ndarray | None = None,
) -> pa.Table:
    """One shard as an Arrow table of ``schema`` (the one function both engines write through)."""
    n = len(ids)
    dim = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    if n and embeddings.shape != (n, dim):
        raise ValueError(f"embeddings of shape {embeddings.shape} for {n} rows of dim {dim}")
    columns: list[pa.Array] = [
        pa.array(list(ids), type=pa.string()),
        pa.array(list(paths), type=pa.string()),
        pa.FixedSizeListArray.from_arrays(flat, dim),
    ]
    if "predictions" in schema.names:
        if topk_index is None or topk_score is None:
            raise ValueError("this schema has predictions: pass topk_index and topk_score")
        k = topk_index.shape[1] if n else 0
        label_arr = pa.array(list(labels), type=pa.string())
        idx_flat = pa.array(topk_index.reshape(-1).astype(np.int32), type=pa.int32())
        structs = pa.StructArray.from_arrays(
            [idx_flat, label_arr.take(idx_flat), pa.array(topk_score.reshape(-1).astype(np.float32))],
            names=["index", "label", "score"],
        )
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32) if n else [0], type=pa.int32())
        columns.append(pa.ListArray.from_arrays(offsets, structs, type=prediction_type()))
    return pa.Table.from_arrays(columns, schema=schema)


def warm_up() -> None:
    """Pay Arrow's one-time start (its first array imports pandas) before timing starts."""
    shard_table(
        output_schema(1, 1),
        ["w"],
        ["w"],
        np.zeros((1, 1), np.float32),
        ["w"],
        np.zeros((1, 1), np.int32),
        np.ones((1, 1), np.float32),
    )


@dataclass
class ShardRecord:
    """What was written for one shard: its rows, its unreadable inputs and where time went."""

    shard: int
    start: int
    stop: int
    rows: int
    errors: list[dict[str, str]] = field(default_factory=list)
    decode_s: float = 0.0
    infer_s: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()


def write_shard(out: Path, record: ShardRecord, table: pa.Table) -> None:
    """Write one finished shard: its record, then its Parquet file, each atomically."""
    records = out / SHARD_RECORDS
    records.mkdir(exist_ok=True)
    write_atomic(records / f"{shard_name(record.shard)[: -len('.parquet')]}.json", record.to_json())
    with replacing(out / shard_name(record.shard)) as tmp:
        pq.write_table(table, tmp, row_group_size=max(1, table.num_rows))


def read_record(out: Path, shard: int) -> ShardRecord | None:
    """The record of a finished shard, or ``None`` when the shard still has to be computed."""
    rec = out / SHARD_RECORDS / f"{shard_name(shard)[: -len('.parquet')]}.json"
    if not (out / shard_name(shard)).is_file() or not rec.is_file():
        return None
    try:
        return ShardRecord(**json.loads(rec.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # a damaged record: the shard is computed again


def _ours(p: Path) -> bool:
    name = p.name
    return (
        (name.startswith("part-") and name.endswith(".parquet"))
        or name in (MANIFEST, ERRORS, SHARD_RECORDS, FRAGMENTS, LOCK)
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def remove_job_files(out: Path) -> None:
    """Delete what a job writes (and nothing else a user may keep in the folder)."""
    for p in out.iterdir():
        if not _ours(p) or p.name == LOCK:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """Exclusive use of ``out`` for one job at a time (a second job fails at once, clearly)."""
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another embedding job is writing to {out}; wait for it or choose another --output"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_output(out: Path, identity: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
    """Make ``out`` ready for the job ``identity`` describes; return the existing manifest when
    the job resumes there. Must be called with :func:`job_lock` held.

    Refuses a folder made by a different job (other inputs, model, shard size or top-k) and a
    non-empty folder that holds no job, unless ``overwrite``, which deletes the job's files.
    """
    manifest_path = out / MANIFEST
    for stale in out.glob(".*.tmp"):  # left by a killed job; the lock says none is running
        stale.unlink()
    if (out / FRAGMENTS).is_dir():
        shutil.rmtree(out / FRAGMENTS)
    if overwrite:
        remove_job_files(out)
        return None
    if manifest_path.is_file():
        try:
            existing: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise OutputError(f"{manifest_path} is unreadable ({e}); pass --overwrite to start over") from None
        differences = [k for k, v in identity.items() if existing.get("job", {}).get(k) != v]
        if differences:
            raise OutputError(
                f"{out} holds embeddings of a different job ({', '.join(differences)} differ); "
                "a job resumes only with the same inputs, model, --shard-size and --top-k. "
                "Pass --overwrite to start over, or choose another --output folder"
            )
        return existing
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise OutputError(
            f"{out} is not empty ({shown}) and holds no embedding job; choose an empty or new folder "
            "(--overwrite deletes only part-*.parquet and _* files a job writes)"
        )
    return None


def merge_errors(out: Path, records: Sequence[ShardRecord]) -> int:
    """Write ``_errors.jsonl`` from the shard records, in input order; returns the error count."""
    lines = [json.dumps(e) for r in sorted(records, key=lambda r: r.shard) for e in r.errors]
    write_atomic(out / ERRORS, ("\n".join(lines) + "\n" if lines else "").encode())
    return len(lines)


def write_manifest(out: Path, doc: dict[str, Any]) -> None:
    write_atomic(out / MANIFEST, json.dumps(doc, indent=2, default=str).encode())

"""What a batch embedding job writes: the Parquet schema and tables, the shard records and the
names in the output folder (a local folder or an object-store prefix, see :mod:`embed.job_output`).

Layout (readers such as Arrow, pandas, Spark and DuckDB skip names starting with ``_`` or ``.``,
the Hadoop convention of ``_SUCCESS`` and ``_metadata``, so the folder reads as one dataset)::

    part-00000.parquet ...   id, path, embedding[, predictions]
    _manifest.json           model, spec checksum, preprocessing, dim, plan fingerprint, counts, versions
    _errors.jsonl            unreadable inputs: id, path, error, kind (merged from the shard records)
    _shards/part-00000.json  one record per finished shard: its rows, errors and timings
    _lock                    held while a job writes here (a flock; on a bucket, a lock object)
    _fragments/              (Ray engine, rarely) pieces of a shard, joined when the run ends

A shard is finished when both its Parquet file and its record exist; a re-run trusts no other.
Each is written whole (a local file under a temporary name renamed into place, an object in one
request), the record first: a Parquet file that readers can see is always a finished shard, and a
job killed at any moment leaves whole shards or none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.errors import BackbonesError
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


def record_name(index: int) -> str:
    """Where the record of shard ``index`` is kept (relative to the output folder)."""
    return f"{SHARD_RECORDS}/part-{index:05d}.json"


def is_job_file(name: str) -> bool:
    """Whether a top-level name in the output folder is one a job writes (``--overwrite`` deletes
    those and nothing else)."""
    return (
        (name.startswith("part-") and name.endswith(".parquet"))
        or name in (MANIFEST, ERRORS, SHARD_RECORDS, FRAGMENTS, LOCK)
        or (name.startswith(".") and name.endswith(".tmp"))
    )


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


def write_parquet(table: pa.Table, where: Any) -> None:
    """A shard's Parquet file, in one row group (``where``: a path or an Arrow output stream)."""
    pq.write_table(table, where, row_group_size=max(1, table.num_rows))

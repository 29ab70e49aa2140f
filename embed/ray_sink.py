"""Writing for the Ray engine: the rows of a shard, as the actors return them, into the local
engine's Parquet shard (:func:`embed.output.shard_table` and
:meth:`embed.job_output.JobOutput.write_shard`).

Each actor call returns one whole shard, so a write task normally holds every row of the shards
it gets and writes them at once, on whichever node it runs: into the output folder, or as whole
objects into the output prefix of an object store (each task opens the output itself, with the
credentials of its node's environment). Should Ray split a shard across write tasks anyway, its
pieces are kept in ``_fragments/`` and the driver joins them when the run ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from . import output as out_
from .job_output import open_output

# what the actors return besides the embedding (and top-k): kept in fragments, see join_fragments
ROW_COLUMNS = ("shard", "pos", "id", "path", "kind", "error", "decode_s", "infer_s", "ready_at")


@dataclass(frozen=True)
class ShardLayout:
    """What a write task needs to turn rows into shard files (small: no input list)."""

    output: str  # an absolute folder or an object-store URL
    dim: int
    top_k: int | None
    labels: list[str]
    metadata: dict[str, str]
    bounds: dict[int, tuple[int, int]]  # shard -> (start, stop), for the shards of this run


def write_ray_shard(layout: ShardLayout, shard: int, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard from all its rows (in any order); returns its record as a dict."""
    start, stop = layout.bounds[shard]
    order = np.argsort(rows["pos"], kind="stable")
    rows = {k: np.asarray(v)[order] for k, v in rows.items()}
    if not np.array_equal(rows["pos"], np.arange(start, stop)):
        raise RuntimeError(f"shard {shard}: rows {start}..{stop - 1} expected, got {len(order)} rows")
    ok = rows["error"] == ""
    schema = out_.output_schema(layout.dim, layout.top_k, layout.metadata)
    embeddings = rows["embedding"].astype(np.float32).reshape(len(ok), -1)[ok]
    table = out_.shard_table(
        schema,
        [str(x) for x in rows["id"][ok]],
        [str(x) for x in rows["path"][ok]],
        embeddings if len(embeddings) else np.zeros((0, layout.dim), np.float32),
        layout.labels,
        rows["topk_index"][ok] if layout.top_k else None,
        rows["topk_score"][ok] if layout.top_k else None,
    )
    errors = [
        {"id": str(i), "path": str(p), "kind": str(k), "error": str(e)}
        for i, p, k, e in zip(rows["id"][~ok], rows["path"][~ok], rows["kind"][~ok], rows["error"][~ok], strict=True)
    ]
    record = out_.ShardRecord(
        shard, start, stop, int(ok.sum()), errors, float(rows["decode_s"].sum()), float(rows["infer_s"].sum())
    )
    open_output(layout.output).write_shard(record, table)
    return {**record.__dict__, "ready_at": float(np.min(rows["ready_at"].astype(np.float64)))}


def _write_fragment(layout: ShardLayout, shard: int, rows: dict[str, np.ndarray]) -> None:
    """Part of a shard, kept until the driver has every part (never seen by dataset readers)."""
    columns = {k: pa.array(list(rows[k])) for k in ROW_COLUMNS}
    columns["embedding"] = pa.array(list(np.asarray(rows["embedding"], dtype=np.float32)))
    if layout.top_k:
        columns["topk_index"] = pa.array(list(np.asarray(rows["topk_index"], dtype=np.int32)))
        columns["topk_score"] = pa.array(list(np.asarray(rows["topk_score"], dtype=np.float32)))
    open_output(layout.output).write_fragment(shard, pa.table(columns))


def join_fragments(layout: ShardLayout) -> list[dict[str, Any]]:
    """Write the shards whose pieces are all in ``_fragments/`` (on the driver), then clear it."""
    out = open_output(layout.output)
    pieces = out.fragments()
    if not pieces:
        return []
    records = []
    for shard, tables in sorted(pieces.items()):
        table = pa.concat_tables(tables)
        rows = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
        rows["pos"] = rows["pos"].astype(np.int64)
        for c in ("decode_s", "infer_s", "ready_at"):
            rows[c] = rows[c].astype(np.float64)
        start, stop = layout.bounds[shard]
        if len(rows["pos"]) == stop - start:
            records.append(write_ray_shard(layout, shard, rows))
    out.clear_fragments()
    return records


def datasink_class() -> type:
    """The Ray ``Datasink`` subclass (made on first use: Ray is imported only by the Ray engine)."""
    from ray.data import Datasink

    class ShardDatasink(Datasink):  # type: ignore[misc, type-arg]
        """Writes the shards whose rows all arrive in one write task; keeps the pieces of the others."""

        def __init__(self, layout: ShardLayout) -> None:
            self.layout = layout
            self.records: list[dict[str, Any]] = []

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
            from ray.data.block import BlockAccessor

            batches = [BlockAccessor.for_block(b).to_batch_format("numpy") for b in blocks]
            batches = [b for b in batches if len(b["shard"])]
            if not batches:
                return []
            rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
            written = []
            for shard in np.unique(rows["shard"]):
                part = {k: v[rows["shard"] == shard] for k, v in rows.items()}
                start, stop = self.layout.bounds[int(shard)]
                if len(part["pos"]) == stop - start:
                    written.append(write_ray_shard(self.layout, int(shard), part))
                else:
                    _write_fragment(self.layout, int(shard), part)
            return written

        def on_write_complete(self, write_result: Any) -> None:
            self.records = [r for task in write_result.write_returns for r in (task or [])]
            self.records += join_fragments(self.layout)

    return ShardDatasink

"""The local engine: decode in worker processes, run ONNX Runtime in this process, write shards.

The main process keeps decode tasks in flight (:class:`embed.decode_pool.DecodePool`) and runs
the version's ONNX graph (:class:`models.inference.InferenceModel`, same session factory and
preprocessing as the service) on each decoded batch as it arrives, so that decoding overlaps
inference; a shard is written as soon as its last batch is inferred. How the cores are shared
between decoding and inference is :func:`models.cores.batch_plan`'s choice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models import InferenceModel, get_settings
from models.cores import BatchPlan, available_cores, batch_plan
from models.runtime import ConcurrentRunner, on_gpu
from models.storage import first_url

from . import output as out_
from .decode import Decoded
from .decode_pool import DecodePool
from .job import EmbedJob, EngineStats, Shard


@dataclass
class _Chunk:
    shard: Shard
    start: int
    stop: int


class _ShardBuffer:
    """Rows of the shard being assembled, in input order."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.ids: list[str] = []
        self.paths: list[str] = []
        self.features: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []
        self.errors: list[dict[str, str]] = []
        self.decode_s = 0.0
        self.infer_s = 0.0


def local_plan(job: EmbedJob) -> BatchPlan:
    """Decode workers, ONNX Runtime calls at once and their threads for ``job`` on this machine."""
    return batch_plan(
        available_cores(),
        gpu=on_gpu(),
        workers=job.config.workers,
        threads=job.config.threads,
        lone_call_threads=get_settings().intra_op_threads,
    )


def run_local(
    job: EmbedJob, todo: Sequence[Shard], *, progress: Any = None
) -> tuple[list[out_.ShardRecord], EngineStats]:
    """Compute the shards ``todo`` as :func:`local_plan` lays out the machine.

    ``progress`` is anything with ``update(n)`` and ``set_postfix(**kw)`` (a tqdm bar) or None.
    """
    layout = local_plan(job)
    stats = EngineStats(workers=layout.workers)
    if not todo:
        return [], stats
    t_start = time.perf_counter()
    store = first_url([it.path for it in job.items])
    with DecodePool(job.loader_config, layout.workers, job.config.batch_size, store=store) as decoder:
        model = InferenceModel(job.stored, threads=layout.threads)  # while the workers start
        runner = ConcurrentRunner(model.run, layout.runners)
        try:
            stats.runners = layout.runners
            stats.threads = int(model.session.session.get_session_options().intra_op_num_threads)
            out_.warm_up()
            decoder.wait_ready()  # timing starts when every worker can decode
            t_run = time.perf_counter()
            stats.startup_s = t_run - t_start
            records = _embed_shards(job, todo, decoder, runner, stats, progress)
            stats.wait_s = decoder.wait_s
            stats.run_s = time.perf_counter() - t_run
        finally:
            runner.close()
    return records, stats


def _embed_shards(
    job: EmbedJob,
    todo: Sequence[Shard],
    decoder: DecodePool,
    runner: ConcurrentRunner,
    stats: EngineStats,
    progress: Any,
) -> list[out_.ShardRecord]:
    """Infer each chunk as it is decoded, and write each shard once its last chunk is in."""
    size = job.config.batch_size
    chunks = [_Chunk(s, a, min(a + size, s.stop)) for s in todo for a in range(s.start, s.stop, size)]
    paths = [it.path for it in job.items]
    records: list[out_.ShardRecord] = []
    buf: _ShardBuffer | None = None
    failed = 0
    for chunk, decoded in zip(chunks, decoder.decoded(paths, [(c.start, c.stop) for c in chunks]), strict=True):
        if buf is None or buf.shard is not chunk.shard:
            buf = _ShardBuffer(chunk.shard)
        buf.decode_s += decoded.seconds
        _infer_into(job, runner, chunk, decoded, buf)
        failed += len(decoded.errors)
        stats.images += chunk.stop - chunk.start
        if progress is not None:
            progress.update(chunk.stop - chunk.start)
            if decoded.errors:
                progress.set_postfix(failed=failed)
        if chunk.stop == chunk.shard.stop:
            records.append(_write_buffer(job, buf, stats))
    return records


def _infer_into(job: EmbedJob, runner: ConcurrentRunner, chunk: _Chunk, decoded: Decoded, buf: _ShardBuffer) -> None:
    if decoded.pixels.shape[0]:
        t0 = time.perf_counter()
        outputs = runner.run(decoded.pixels)
        buf.infer_s += time.perf_counter() - t0
        buf.features.append(outputs.features)
        if job.config.top_k:
            buf.logits.append(outputs.logits)
    for i in range(chunk.stop - chunk.start):
        item = job.items[chunk.start + i]
        if decoded.ok[i]:
            buf.ids.append(item.id)
            buf.paths.append(item.path)
        else:
            kind, message = decoded.errors[i]
            buf.errors.append({"id": item.id, "path": item.path, "kind": kind, "error": message})


def _write_buffer(job: EmbedJob, buf: _ShardBuffer, stats: EngineStats) -> out_.ShardRecord:
    t0 = time.perf_counter()
    dim = job.spec.feature_dim
    features = np.concatenate(buf.features) if buf.features else np.zeros((0, dim), np.float32)
    logits = np.concatenate(buf.logits) if buf.logits else np.zeros((0, job.spec.num_classes), np.float32)
    table = job.table(buf.ids, buf.paths, features, logits if job.config.top_k else None)
    shard = buf.shard
    record = out_.ShardRecord(shard.index, shard.start, shard.stop, len(buf.ids), buf.errors, buf.decode_s, buf.infer_s)
    job.output.write_shard(record, table)
    stats.write_s += time.perf_counter() - t0
    stats.decode_s += buf.decode_s
    stats.infer_s += buf.infer_s
    return record

"""The local engine: decode in worker processes, run ONNX Runtime in this process, write shards.

The main process keeps a window of decode tasks in flight (a few per worker) and runs the
version's ONNX graph (:class:`models.inference.InferenceModel`, same session factory and
preprocessing as the service) on each decoded batch as it arrives, so that decoding overlaps
inference; a shard is written as soon as its last batch is inferred.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from models import InferenceModel
from models.errors import BackbonesError
from models.files import pid_alive
from models.runtime import Outputs, available_cores, on_gpu

from . import output as out_
from .decode import Decoded, Slot, decode_chunk, decode_in_worker, init_worker
from .job import DEFAULT_BATCH_SIZE, EmbedJob, EngineStats, Shard

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120
SEGMENT_PREFIX = "backbones-embed-"  # shared-memory decode buffers: backbones-embed-<pid>-<random>


class DecodeWorkerError(BackbonesError):
    """A decode worker process could not start or died mid-job."""


def default_workers(cores: int | None = None) -> int:
    """Decode processes: half the cores on CPU, where ONNX Runtime needs most of the machine
    (EfficientNet-Lite0 here: ~6 ms/img to decode vs ~19 core-ms/img of inference; one decode
    process and two ORT threads did as well as any mix on 2 cores, docs/benchmarks.md); every
    core with a GPU, where decoding is the bottleneck."""
    cores = cores or available_cores()
    return cores if on_gpu() else max(1, cores // 2)


def default_runners(threads: int | None, cores: int | None = None) -> int:
    """Concurrent ONNX Runtime calls on a CPU: one per core, each on one intra-op thread, the batch
    split into micro-batches of :data:`MICRO_BATCH`. On 2 cores this did ~1.5x the images/s of one
    batch-32 call on two threads (docs/benchmarks.md): small calls keep both cores busy, where one
    call's threads wait for each other between layers. One call with a GPU or when ``--threads``
    is given."""
    if threads is not None or on_gpu():
        return 1
    return cores or available_cores()


MICRO_BATCH = 2


class ConcurrentRunner:
    """Runs a batch through ``run`` (a session's or model's): one call, or micro-batches on
    ``runners`` threads at once (ONNX Runtime sessions take concurrent calls)."""

    def __init__(self, run: Callable[[np.ndarray], Outputs], runners: int) -> None:
        self._run = run
        self.pool = ThreadPoolExecutor(runners, thread_name_prefix="ort") if runners > 1 else None

    def run(self, pixels: np.ndarray) -> Outputs:
        if self.pool is None or len(pixels) <= MICRO_BATCH:
            return self._run(pixels)
        parts = list(self.pool.map(self._run, np.split(pixels, range(MICRO_BATCH, len(pixels), MICRO_BATCH))))
        return Outputs(
            logits=np.concatenate([p.logits for p in parts]), features=np.concatenate([p.features for p in parts])
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


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


def run_local(
    job: EmbedJob,
    todo: Sequence[Shard],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    threads: int | None = None,
    progress: Any = None,
) -> tuple[list[out_.ShardRecord], EngineStats]:
    """Compute the shards ``todo``: decode in ``workers`` processes (0: in this process) while
    this process runs ONNX Runtime on the decoded batches: with ``threads`` intra-op threads when
    given, else (CPU) one single-threaded call per core at once (:func:`default_runners`).

    ``progress`` is anything with ``update(n)`` and ``set_postfix(**kw)`` (a tqdm bar) or None.
    """
    workers = default_workers() if workers is None else workers
    stats = EngineStats(workers=workers)
    if not todo:
        return [], stats
    t_start = time.perf_counter()
    pool: ProcessPoolExecutor | None = None
    runner: ConcurrentRunner | None = None
    shm: shared_memory.SharedMemory | None = None
    slots: np.ndarray | None = None
    if workers > 0:
        # spawn: workers start clean (no ONNX Runtime threads or locks inherited from this process)
        ctx = mp.get_context("spawn")
        ready = ctx.Semaphore(0)
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=init_worker, initargs=(job.loader_config, ready)
        )
        for _ in range(workers):  # the pool starts a process per task while none is idle
            pool.submit(int)
    try:
        runners = default_runners(threads)
        model = InferenceModel(job.stored, threads=1 if runners > 1 else threads)  # while the workers start
        runner = ConcurrentRunner(model.run, runners)
        stats.runners = runners
        stats.threads = int(model.session.session.get_session_options().intra_op_num_threads)
        out_.warm_up()
        if pool is not None:
            for _ in range(workers):  # timing starts when every worker can decode
                if not ready.acquire(timeout=WORKER_START_TIMEOUT_S):
                    raise DecodeWorkerError(f"the decode workers did not start within {WORKER_START_TIMEOUT_S} s")
        loader = model.loader
        t_run = time.perf_counter()
        stats.startup_s = t_run - t_start
        spans = [_Chunk(s, a, min(a + batch_size, s.stop)) for s in todo for a in range(s.start, s.stop, batch_size)]
        chunks = iter(spans)
        window: deque[tuple[_Chunk, Future[Decoded] | None, int]] = deque()
        paths = [it.path for it in job.items]
        # enough decoded chunks in flight to keep every worker busy while one batch is inferred,
        # and a shared-memory slot for each of them plus the one being inferred
        in_flight = 2 * workers + 1 if pool else 1
        crop = job.spec.preprocess.crop
        shape = (in_flight + 1, batch_size, 3, crop, crop)
        if pool is not None:
            _remove_stale_segments()
            shm = shared_memory.SharedMemory(
                name=f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}", create=True, size=int(np.prod(shape)) * 4
            )
            slots = np.ndarray(shape, dtype=np.float32, buffer=shm.buf)
        shm_name = shm.name if shm is not None else ""
        free = deque(range(shape[0]))

        def submit() -> None:
            c = next(chunks, None)
            if c is not None:
                slot = free.popleft()
                paths_c = paths[c.start : c.stop]
                fut = pool.submit(decode_in_worker, paths_c, Slot(shm_name, slot, shape)) if pool else None
                window.append((c, fut, slot))

        for _ in range(in_flight):
            submit()
        records: list[out_.ShardRecord] = []
        buf: _ShardBuffer | None = None
        failed = 0
        while window:
            chunk, pending, slot = window.popleft()
            t0 = time.perf_counter()
            try:
                if pending is None:
                    decoded = decode_chunk(loader, paths[chunk.start : chunk.stop])
                else:
                    decoded = pending.result()
                    assert slots is not None
                    decoded.pixels = slots[slot][: int(decoded.ok.sum())]
            except BrokenProcessPool:
                raise DecodeWorkerError(
                    f"a decode worker died while reading inputs {chunk.start}..{chunk.stop - 1} (killed, out of "
                    f"memory, or crashed on a file); the {len(records)} shard(s) finished in this run are kept: "
                    "run the same command again to resume"
                ) from None
            stats.wait_s += time.perf_counter() - t0
            submit()
            if buf is None or buf.shard is not chunk.shard:
                buf = _ShardBuffer(chunk.shard)
            buf.decode_s += decoded.seconds
            _infer_into(job, runner, chunk, decoded, buf)
            free.append(slot)  # ORT is done with it
            failed += len(decoded.errors)
            stats.images += chunk.stop - chunk.start
            if progress is not None:
                progress.update(chunk.stop - chunk.start)
                if decoded.errors:
                    progress.set_postfix(failed=failed)
            if chunk.stop == chunk.shard.stop:
                t1 = time.perf_counter()
                records.append(_write_buffer(job, buf))
                stats.write_s += time.perf_counter() - t1
                stats.decode_s += buf.decode_s
                stats.infer_s += buf.infer_s
        stats.run_s = time.perf_counter() - t_run
        return records, stats
    finally:
        if runner is not None:
            runner.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if shm is not None:
            slots = decoded = None  # type: ignore[assignment]  # views into the segment go first
            try:
                shm.close()
            except BufferError:  # a view is still referenced (an error's traceback): unlink anyway
                log.debug("shared decode buffer still in use at exit")
            shm.unlink()


def _remove_stale_segments() -> None:
    """Unlink decode buffers of jobs killed with all their processes at once (Linux: /dev/shm);
    otherwise Python's resource tracker unlinks them when a job dies."""
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        return
    for f in shm_dir.glob(f"{SEGMENT_PREFIX}*"):
        pid = f.name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                f.unlink()


def _infer_into(job: EmbedJob, runner: ConcurrentRunner, chunk: _Chunk, decoded: Decoded, buf: _ShardBuffer) -> None:
    if decoded.pixels.shape[0]:
        t0 = time.perf_counter()
        outputs = runner.run(decoded.pixels)
        buf.infer_s += time.perf_counter() - t0
        buf.features.append(outputs.features)
        if job.top_k:
            buf.logits.append(outputs.logits)
    for i in range(chunk.stop - chunk.start):
        item = job.items[chunk.start + i]
        if decoded.ok[i]:
            buf.ids.append(item.id)
            buf.paths.append(item.path)
        else:
            kind, message = decoded.errors[i]
            buf.errors.append({"id": item.id, "path": item.path, "kind": kind, "error": message})


def _write_buffer(job: EmbedJob, buf: _ShardBuffer) -> out_.ShardRecord:
    dim = job.spec.feature_dim
    features = np.concatenate(buf.features) if buf.features else np.zeros((0, dim), np.float32)
    logits = np.concatenate(buf.logits) if buf.logits else np.zeros((0, job.spec.num_classes), np.float32)
    table = job.table(buf.ids, buf.paths, features, logits if job.top_k else None)
    shard = buf.shard
    record = out_.ShardRecord(shard.index, shard.start, shard.stop, len(buf.ids), buf.errors, buf.decode_s, buf.infer_s)
    out_.write_shard(job.output, record, table)
    return record

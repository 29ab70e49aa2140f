"""Decoding ahead of inference for the local engine.

Worker processes decode chunks of paths into one shared-memory segment of batch-sized buffers,
with enough chunks in flight to keep every worker busy while the main process infers one batch.
With no workers, the main process decodes each chunk when it is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from pathlib import Path
from types import TracebackType

import numpy as np

from models.errors import BackbonesError
from models.files import pid_alive

from .decode import Decoded, LoaderConfig, SharedBatch, decode_chunk, decode_in_worker, init_worker

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120
SEGMENT_PREFIX = "backbones-embed-"  # shared-memory decode buffers: backbones-embed-<pid>-<random>


class DecodeWorkerError(BackbonesError):
    """A decode worker process could not start or died mid-job."""


class DecodePool:
    """``workers`` decode processes (0: decode in this process) for chunks of at most
    ``batch_size`` paths. Use as a context manager: leaving it stops the workers and frees the
    segment. ``wait_s`` sums the time the caller waited for decoded chunks."""

    def __init__(self, config: LoaderConfig, workers: int, batch_size: int) -> None:
        self.workers = workers
        self.wait_s = 0.0
        self._config = config
        self._pool: ProcessPoolExecutor | None = None
        self._shm: shared_memory.SharedMemory | None = None
        # enough decoded chunks in flight to keep every worker busy while one batch is inferred,
        # and a buffer for each of them plus the one being inferred
        self.in_flight = 2 * workers + 1 if workers else 1
        crop = int(config.preprocess["crop"])
        self._shape = (self.in_flight + 1, batch_size, 3, crop, crop)
        if workers > 0:
            # spawn: workers start clean (no ONNX Runtime threads or locks inherited from this process)
            ctx = mp.get_context("spawn")
            self._ready = ctx.Semaphore(0)
            self._pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=init_worker, initargs=(config, self._ready)
            )
            for _ in range(workers):  # the pool starts a process per task while none is idle
                self._pool.submit(int)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def wait_ready(self) -> None:
        """Return once every worker can decode."""
        for _ in range(self.workers):
            if not self._ready.acquire(timeout=WORKER_START_TIMEOUT_S):
                raise DecodeWorkerError(f"the decode workers did not start within {WORKER_START_TIMEOUT_S} s")

    def decoded(self, paths: Sequence[str], spans: Sequence[tuple[int, int]]) -> Iterator[Decoded]:
        """``paths[start:stop]`` decoded for each span, in order. A chunk's pixels stay valid until
        the next one is asked for."""
        if self._pool is None:
            loader = self._config.build()
            for start, stop in spans:
                t0 = time.perf_counter()
                decoded = decode_chunk(loader, paths[start:stop])
                self.wait_s += time.perf_counter() - t0
                yield decoded
            return
        pool, (name, buffers) = self._pool, self._open_segment()
        free = deque(range(len(buffers)))
        todo = iter(spans)
        window: deque[tuple[tuple[int, int], Future[Decoded], int]] = deque()

        def submit() -> None:
            span = next(todo, None)
            if span is not None:
                index = free.popleft()
                target = SharedBatch(name, index, self._shape)
                window.append((span, pool.submit(decode_in_worker, paths[span[0] : span[1]], target), index))

        for _ in range(self.in_flight):
            submit()
        while window:
            (start, stop), pending, index = window.popleft()
            t0 = time.perf_counter()
            try:
                decoded = pending.result()
            except BrokenProcessPool:
                raise DecodeWorkerError(
                    f"a decode worker died while reading inputs {start}..{stop - 1} (killed, out of memory, "
                    "or crashed on a file)"
                ) from None
            self.wait_s += time.perf_counter() - t0
            decoded.pixels = buffers[index][: int(decoded.ok.sum())]
            submit()
            yield decoded
            free.append(index)  # ONNX Runtime is done with it

    def _open_segment(self) -> tuple[str, np.ndarray]:
        """The shared segment's name and its buffers, as an array of ``in_flight + 1`` batches."""
        _remove_stale_segments()
        self._shm = shared_memory.SharedMemory(
            name=f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}",
            create=True,
            size=int(np.prod(self._shape)) * 4,
        )
        return self._shm.name, np.ndarray(self._shape, dtype=np.float32, buffer=self._shm.buf)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a view is still referenced (an error's traceback): unlink anyway
                log.debug("shared decode buffer still in use at exit")
            self._shm.unlink()
            self._shm = None


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

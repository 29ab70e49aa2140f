"""Decoding ahead of inference for the local engine.

Worker processes decode chunks of paths into one shared-memory segment of batch-sized buffers,
with enough chunks in flight to keep every worker busy while the main process infers one batch.
With no workers, the main process decodes each chunk when it is asked for. Where /dev/shm is too
small for those buffers (a container's default is 64 MiB), fewer chunks are kept in flight, or
the decoded pixels come back through the pool's pipes.
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
SHM_DIR = Path("/dev/shm")
# The most of /dev/shm's free space one job's buffers take: a worker writing into a segment that
# no longer fits gets SIGBUS, and other jobs and libraries use /dev/shm too.
SHM_MAX_SHARE = 0.8


class DecodeWorkerError(BackbonesError):
    """A decode worker process could not start or died mid-job."""


class DecodePool:
    """``workers`` decode processes (0: decode in this process) for chunks of at most
    ``batch_size`` paths. Use as a context manager: leaving it stops the workers and frees the
    segment. ``wait_s`` sums the time the caller waited for decoded chunks.

    ``shm_free``: the bytes free in /dev/shm (None: measured with ``os.statvfs``); see
    :func:`transfer_plan` for what is done when the buffers would not fit. ``store``: an object
    URL the inputs are read from (the workers make their file system while they start).
    """

    def __init__(
        self,
        config: LoaderConfig,
        workers: int,
        batch_size: int,
        *,
        shm_free: int | None = None,
        store: str | None = None,
    ) -> None:
        self.workers = workers
        self.wait_s = 0.0
        self._config = config
        self._pool: ProcessPoolExecutor | None = None
        self._shm: shared_memory.SharedMemory | None = None
        crop = int(config.preprocess["crop"])
        batch_bytes = batch_size * 3 * crop * crop * 4
        self.in_flight, self.shared = transfer_plan(
            workers, batch_bytes, shm_free_bytes() if shm_free is None else shm_free
        )
        self._shape = (self.in_flight + 1, batch_size, 3, crop, crop)
        if workers > 0:
            # spawn: workers start clean (no ONNX Runtime threads or locks inherited from this process)
            ctx = mp.get_context("spawn")
            self._ready = ctx.Semaphore(0)
            self._pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=init_worker, initargs=(config, self._ready, store)
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
        pool, (name, buffers) = self._pool, self._open_segment() if self.shared else ("", None)
        free = deque(range(self.in_flight + 1))
        todo = iter(spans)
        window: deque[tuple[tuple[int, int], Future[Decoded], int]] = deque()

        def submit() -> None:
            span = next(todo, None)
            if span is not None:
                index = free.popleft()
                target = SharedBatch(name, index, self._shape) if buffers is not None else None
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
            if buffers is not None:
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


def shm_free_bytes() -> int | None:
    """Bytes free in /dev/shm; None where there is none (shared memory lives elsewhere)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def transfer_plan(workers: int, batch_bytes: int, shm_free: int | None) -> tuple[int, bool]:
    """Chunks to keep in flight and whether decoded chunks cross in shared memory.

    Ideally ``2 * workers + 1`` chunks (every worker busy while one batch is inferred), each with
    a buffer, plus the one being inferred. When those buffers would take more than
    :data:`SHM_MAX_SHARE` of ``shm_free`` (None: unknown, assumed enough), fewer chunks are kept
    in flight, down to one per worker; below that the pixels travel through pipes. Either
    fallback is logged.
    """
    in_flight = 2 * workers + 1 if workers else 1
    if not workers or shm_free is None or (in_flight + 1) * batch_bytes <= SHM_MAX_SHARE * shm_free:
        return in_flight, True
    buffers = int(SHM_MAX_SHARE * shm_free // batch_bytes)
    mib = f"{shm_free / 2**20:.0f} MiB"
    if buffers - 1 >= workers:
        log.warning(
            "/dev/shm has %s free: %d decoded batches in flight instead of %d (a larger /dev/shm is faster)",
            mib,
            buffers - 1,
            in_flight,
        )
        return buffers - 1, True
    log.warning(
        "/dev/shm has %s free, too little for the decode buffers (%d x %.0f MiB): decoded images go "
        "through pipes instead, which is slower. Give the job a larger /dev/shm (docker run --shm-size, "
        "a memory-backed emptyDir on Kubernetes)",
        mib,
        workers + 1,
        batch_bytes / 2**20,
    )
    return in_flight, False


def _remove_stale_segments() -> None:
    """Unlink decode buffers of jobs killed with all their processes at once (Linux: /dev/shm);
    otherwise Python's resource tracker unlinks them when a job dies."""
    if not SHM_DIR.is_dir():
        return
    for f in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        pid = f.name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                f.unlink()

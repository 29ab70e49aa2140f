"""Micro-batching in front of one ONNX Runtime session, with admission control.

Up to ``runners`` batches run at once (ONNX Runtime sessions take concurrent calls). Requests that
arrive while every runner is busy form the next batch (up to ``max_batch_size``): a lone request
runs at once (through ``run_alone`` when given: a session with more threads, since nothing runs
beside it), a crowd is served in full batches, and no request waits for a timer, so nothing is
shed below capacity. :func:`calibrate_batch_size` picks ``max_batch_size`` from measured batch
times when a model loads.
Admission is bounded: beyond ``queue_limit`` requests in flight, :class:`OverloadedError` is raised at
once (the HTTP layer answers 503 with ``Retry-After``) instead of letting latency grow unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.runtime import Outputs

log = logging.getLogger(__name__)


class OverloadedError(Exception):
    """More requests are in flight than the batcher admits."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"overloaded; retry after {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]
    enqueued: float


@dataclass(frozen=True)
class BatchStats:
    size: int
    queue_wait: list[float]
    inference_seconds: float


def calibrate_batch_size(
    run: Callable[[np.ndarray], Outputs], input_shape: Sequence[int], *, limit: int = 32, tolerance: float = 0.05
) -> tuple[int, dict[int, float]]:
    """The smallest batch size whose images/s is within ``tolerance`` of the best among 1, 2, 4 ..
    ``limit``, and the measured images/s per size.

    Each size runs a few times (the best time counts); sizes stop doubling once throughput has
    fallen clearly below the best so far. On a CPU, per-image cost often grows with the batch
    (docs/benchmarks.md), so bigger is not better."""
    rates: dict[int, float] = {}
    size = 1
    while size <= max(1, limit):
        batch = np.zeros((size, *input_shape), dtype=np.float32)
        run(batch)  # the first call at a new shape pays for allocations
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            run(batch)
            best = min(best, time.perf_counter() - start)
        rates[size] = size / max(best, 1e-9)
        if rates[size] < 0.8 * max(rates.values()):
            break
        size *= 2
    top = max(rates.values())
    chosen = min(s for s, r in rates.items() if r >= (1 - tolerance) * top)
    return chosen, rates


class MicroBatcher:
    """Batches single preprocessed images for ``run``, called in up to ``runners`` threads at once;
    a batch that starts while no other runs goes to ``run_alone`` where given."""

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        *,
        run_alone: Callable[[np.ndarray], Outputs] | None = None,
        max_batch_size: int,
        queue_limit: int,
        runners: int = 1,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self._run_alone = run_alone or run
        self.max_batch_size = max_batch_size
        self.queue_limit = queue_limit
        self.runners = runners
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=runners, thread_name_prefix=f"infer-{name}")
        self.admitted = 0  # requests between admit() and release()
        self._closing = False
        self._batch_seconds = 0.05  # running estimate of one batch's time, for Retry-After

    def admit(self) -> None:
        """Take a place for one request (before decoding it) or raise :class:`OverloadedError`."""
        if self._closing or self.admitted >= self.queue_limit:
            batches_ahead = max(1.0, self.admitted / (self.max_batch_size * self.runners))
            raise OverloadedError(retry_after=max(1.0, round(batches_ahead * self._batch_seconds)))
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    def _ensure_started(self) -> asyncio.Queue[_Item]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self._queue

    async def infer(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features for one preprocessed image (3, H, W). Call between admit/release."""
        queue = self._ensure_started()
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Item(array, future, time.perf_counter()))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        free = asyncio.Semaphore(self.runners)
        while True:
            await free.acquire()  # while every runner is busy, requests queue up into the next batch
            first = await self._queue.get()
            items = [first]
            while len(items) < self.max_batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [it for it in items if not it.future.cancelled()]
            if not items:
                free.release()
                continue
            run = self._run_alone if not self._running else self._run
            task = asyncio.get_running_loop().create_task(self._run_batch(items, run))
            self._running.add(task)

            def finished(t: asyncio.Task[None]) -> None:
                self._running.discard(t)
                free.release()

            task.add_done_callback(finished)

    async def _run_batch(self, items: list[_Item], run: Callable[[np.ndarray], Outputs]) -> None:
        start = time.perf_counter()
        try:
            batch = np.stack([it.array for it in items])
            out = await asyncio.get_running_loop().run_in_executor(self._executor, run, batch)
        except Exception as e:  # a failed batch fails its requests, not the loop
            log.exception("inference failed for a batch of %d", len(items))
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        elapsed = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        for i, it in enumerate(items):
            if not it.future.done():
                it.future.set_result((out.logits[i], out.features[i]))
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(items), [start - it.enqueued for it in items], elapsed))

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let admitted requests finish (up to ``drain_timeout``), then stop."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout
        while self.admitted > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:
            await asyncio.wait(set(self._running), timeout=max(0.0, deadline - time.monotonic()))
        self._executor.shutdown(wait=True)

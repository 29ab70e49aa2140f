"""Micro-batching in front of one ONNX Runtime session, with admission control.

Requests that arrive while a batch runs form the next batch (up to ``max_batch_size``): a lone
request runs at once, a crowd is served in full batches, and no request waits for a timer.
Admission is bounded: beyond ``queue_limit`` requests in flight, :class:`OverloadedError` is raised at
once (the HTTP layer answers 503 with ``Retry-After``) instead of letting latency grow unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
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


class MicroBatcher:
    """Batches single preprocessed images for ``run`` (called in a dedicated thread)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        *,
        max_batch_size: int,
        queue_limit: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.queue_limit = queue_limit
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        # one inference thread: ONNX Runtime parallelises inside a call; two calls at once
        # would only fight over the same cores
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self.admitted = 0  # requests between admit() and release()
        self._closing = False
        self._batch_seconds = 0.05  # running estimate of one batch's time, for Retry-After

    def admit(self) -> None:
        """Take a place for one request (before decoding it) or raise :class:`OverloadedError`."""
        if self._closing or self.admitted >= self.queue_limit:
            batches_ahead = max(1.0, self.admitted / self.max_batch_size)
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
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            items = [first]
            while len(items) < self.max_batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [it for it in items if not it.future.cancelled()]
            if not items:
                continue
            start = time.perf_counter()
            try:
                batch = np.stack([it.array for it in items])
                out = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # a failed batch fails its requests, not the loop
                log.exception("inference failed for a batch of %d", len(items))
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
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
        self._executor.shutdown(wait=True)

"""The service's micro-batcher (service/batching.py) with real numpy work in its runner threads,
and the second session a lone call runs on (models.inference.InferenceModel.run_alone)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from models import StoredVersion
from models.inference import InferenceModel
from models.runtime import Outputs
from service.batching import MicroBatcher, OverloadedError

SHAPE = (3, 4, 4)


class Runs:
    """A model stand-in: echoes each image's mean as its logit, recording batch sizes, and can
    hold every call until released (so that requests queue behind a running batch)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> Outputs:
        self.gate.wait(timeout=30)
        self.sizes.append(len(batch))
        means = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)
        return Outputs(logits=means, features=np.repeat(means, 2, axis=1))


def image(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


async def infer(batcher: MicroBatcher, value: float) -> float:
    batcher.admit()
    try:
        logits, _ = await batcher.infer(image(value))
        return float(logits[0])
    finally:
        batcher.release()


def test_a_lone_request_runs_at_once_on_the_lone_session() -> None:
    wide, narrow = Runs(), Runs()

    async def go() -> None:
        batcher = MicroBatcher(narrow, run_alone=wide, max_batch_size=8, queue_limit=16, runners=2)
        assert await infer(batcher, 3.0) == 3.0
        assert await infer(batcher, 5.0) == 5.0
        await batcher.close()

    asyncio.run(go())
    assert wide.sizes == [1, 1] and narrow.sizes == []


def test_requests_that_arrive_while_a_batch_runs_go_to_the_other_runners_in_batches() -> None:
    wide, narrow = Runs(), Runs()

    async def go() -> None:
        batcher = MicroBatcher(narrow, run_alone=wide, max_batch_size=4, queue_limit=64, runners=2)
        wide.gate.clear()
        narrow.gate.clear()
        first = asyncio.ensure_future(infer(batcher, 1.0))
        await asyncio.sleep(0.05)  # the first batch now runs alone (held)
        rest = [asyncio.ensure_future(infer(batcher, float(v))) for v in range(2, 12)]
        await asyncio.sleep(0.05)
        wide.gate.set()
        narrow.gate.set()
        answers = await asyncio.gather(first, *rest)
        assert answers == [float(v) for v in range(1, 12)]  # every answer is its own image's
        await batcher.close()

    asyncio.run(go())
    assert wide.sizes[0] == 1
    assert sum(wide.sizes) + sum(narrow.sizes) == 11
    assert narrow.sizes and max(narrow.sizes) == 4  # the queue formed full batches beside the lone call
    assert all(size <= 4 for size in wide.sizes + narrow.sizes)


def test_admission_is_bounded_and_says_when_to_retry() -> None:
    async def go() -> None:
        batcher = MicroBatcher(Runs(), max_batch_size=2, queue_limit=3, runners=1)
        for _ in range(3):
            batcher.admit()
        with pytest.raises(OverloadedError) as refused:
            batcher.admit()
        assert refused.value.retry_after >= 1
        batcher.release()
        batcher.admit()  # a place freed is a place taken
        for _ in range(3):
            batcher.release()
        await batcher.close()
        with pytest.raises(OverloadedError):  # closing: nothing new is admitted
            batcher.admit()

    asyncio.run(go())


def test_a_failed_batch_fails_its_requests_and_the_next_ones_are_served() -> None:
    calls: list[int] = []

    def flaky(batch: np.ndarray) -> Outputs:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the session failed")
        return Runs()(batch)

    async def go() -> None:
        batcher = MicroBatcher(flaky, max_batch_size=2, queue_limit=8, runners=1)
        with pytest.raises(RuntimeError, match="the session failed"):
            await infer(batcher, 1.0)
        assert await infer(batcher, 2.0) == 2.0
        await batcher.close()

    asyncio.run(go())
    assert calls == [1, 1]


def test_the_lone_session_has_more_threads_and_the_same_answers(tiny_version: StoredVersion) -> None:
    model = InferenceModel(tiny_version, threads=1, preflight=False, lone_threads=2)
    assert model.lone_session is not model.session
    assert model.session.session.get_session_options().intra_op_num_threads == 1
    assert model.lone_session.session.get_session_options().intra_op_num_threads == 2
    batch = np.random.default_rng(0).standard_normal((3, *model.session.input_shape[1:])).astype(np.float32)
    one, alone = model.run(batch), model.run_alone(batch)
    np.testing.assert_allclose(alone.logits, one.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(alone.features, one.features, rtol=1e-5, atol=1e-5)
    same = InferenceModel(tiny_version, threads=2, preflight=False, lone_threads=2)
    assert same.lone_session is same.session  # no second session where it would have the same threads

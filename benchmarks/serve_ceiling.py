"""What serving could reach with no HTTP at all, measured in this process on the same photos: the
in-process ceiling (decode + preprocess + ONNX Runtime on every core) in the arrangements that do
best here, and the time one photo takes alone (the floor of a lone request's latency)."""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def batched(onnx_path: Path, pre: Any, photos: list[bytes], decode_threads: int, batch: int, seconds: float) -> float:
    """Decode threads run ahead of one batched ONNX Runtime call at a time on every core."""
    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession

    session = OnnxSession(onnx_path, threads=os.cpu_count())
    loader = ImageLoader(pre)
    source = itertools.cycle(photos)
    with ThreadPoolExecutor(decode_threads) as pool:
        pending = deque(pool.submit(loader, next(source)) for _ in range(2 * batch))
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            arrays = [pending.popleft().result() for _ in range(batch)]
            pending.extend(pool.submit(loader, next(source)) for _ in range(batch))
            session.run(np.stack(arrays))
            done += batch
        elapsed = time.perf_counter() - start
        for f in pending:
            f.cancel()
    return done / elapsed


def per_worker(onnx_path: Path, pre: Any, photos: list[bytes], workers: int, seconds: float) -> float:
    """``workers`` threads each decode one photo and run it (batch 1) on a shared one-thread session."""
    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession

    session = OnnxSession(onnx_path, threads=1)
    loader = ImageLoader(pre)
    stop = time.perf_counter() + seconds
    counts = [0] * workers

    def work(i: int) -> None:
        for photo in itertools.islice(itertools.cycle(photos), i * 7, None):
            if time.perf_counter() >= stop:
                return
            session.run(loader(photo)[None])
            counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    return sum(counts) / (time.perf_counter() - start)


def arrangements(onnx_path: Path, pre: Any, photos: list[bytes], seconds: float) -> dict[str, float]:
    """Images/s of each arrangement tried; the ceiling is the best of them."""
    cores = os.cpu_count() or 1
    out = {}
    for batch in (16, 8):
        out[f"decode_threads={cores} batch={batch} ort_threads={cores}"] = batched(
            onnx_path, pre, photos, cores, batch, seconds
        )
    for workers in (cores, cores + 1):
        out[f"workers={workers} batch=1 ort_threads=1"] = per_worker(onnx_path, pre, photos, workers, seconds)
    return out


def remeasure(best: str, onnx_path: Path, pre: Any, photos: list[bytes], seconds: float) -> float:
    """The best arrangement again (paired with each round's HTTP runs: the VM's speed drifts)."""
    fields = dict(item.split("=") for item in best.split())
    if "workers" in fields:
        return per_worker(onnx_path, pre, photos, int(fields["workers"]), seconds)
    return batched(onnx_path, pre, photos, int(fields["decode_threads"]), int(fields["batch"]), seconds)


def single_photo_ms(onnx_path: Path, pre: Any, photos: list[bytes]) -> float:
    """Median milliseconds to decode, preprocess and run one photo alone on every core: what a lone
    request could take with no HTTP and no queue."""
    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession

    session = OnnxSession(onnx_path, threads=os.cpu_count())
    loader = ImageLoader(pre)
    times = []
    for photo in photos:
        start = time.perf_counter()
        session.run(loader(photo)[None])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000

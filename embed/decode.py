"""Decoding for the batch job, run in worker processes (local engine) or Ray tasks.

Each worker builds the model's :class:`models.preprocess.ImageLoader` once (the same eval
transform the service uses) and turns a chunk of paths into one float32 batch. A path may be an
object's URL: the worker reads its bytes itself (:func:`embed.reads.read_ahead`, with its own
file system instance). This module imports no ONNX Runtime, and no Arrow unless the inputs are
objects, so that worker processes start quickly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from models.errors import ImageError
from models.preprocess import ImageLoader
from models.spec import Preprocess
from models.storage import StorageError

from .reads import read_ahead, warm_up


@dataclass(frozen=True)
class LoaderConfig:
    """What a worker needs to build the loader: the spec's preprocessing and the decode settings
    of the process that plans the job (so that every worker decodes alike)."""

    preprocess: dict[str, Any]
    max_pixels: int
    draft: bool

    @classmethod
    def of(cls, loader: ImageLoader) -> LoaderConfig:
        return cls(loader.preprocess.to_dict(), loader.max_pixels, loader.draft_short_side is not None)

    def build(self) -> ImageLoader:
        pre = dict(self.preprocess)
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        return ImageLoader(Preprocess(**pre), max_pixels=self.max_pixels, draft=self.draft)


@dataclass
class Decoded:
    """A decoded chunk: ``pixels`` holds the readable images in order, ``ok[i]`` says whether
    input ``i`` is among them, ``errors`` maps the others' positions to ``(kind, message)``."""

    pixels: np.ndarray  # (n_ok, 3, crop, crop) float32
    ok: np.ndarray  # (n,) bool
    errors: dict[int, tuple[str, str]]
    seconds: float


def decode_chunk(
    loader: ImageLoader,
    paths: Sequence[str],
    out: np.ndarray | None = None,
    sources: Iterator[Callable[[], Any]] | None = None,
) -> Decoded:
    """Decode and preprocess ``paths``; an unreadable image is recorded, never raised (an object
    store that fails as a whole raises :class:`models.storage.StorageError`).

    ``out``: an array of at least ``len(paths)`` images to decode into (the readable ones go
    first, in order); ``pixels`` is then a view of it. ``sources``: ``read_ahead(paths)`` begun
    by the caller (so that its reads started earlier).
    """
    t0 = time.perf_counter()
    crop = loader.preprocess.crop
    if out is None:
        out = np.empty((len(paths), 3, crop, crop), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    errors: dict[int, tuple[str, str]] = {}
    n = 0
    for i, source in enumerate(read_ahead(paths) if sources is None else sources):
        try:
            out[n] = loader(source())
            ok[i] = True
            n += 1
        except StorageError:
            raise
        except ImageError as e:
            errors[i] = (e.kind, str(e))
        except Exception as e:  # one odd file must not stop a job over millions
            errors[i] = ("error", f"{type(e).__name__}: {e}")
    return Decoded(out[:n], ok, errors, time.perf_counter() - t0)


# -- process-pool entry points (module level so that spawned workers can import them) ----------

_loader: ImageLoader | None = None


def init_worker(config: LoaderConfig, ready: Any = None, store: str | None = None) -> None:
    """Build this worker's loader (and its file system for the object URL ``store``, if the
    inputs are objects); release ``ready`` (a semaphore) once it can decode.

    A worker whose job was killed (SIGKILL, out of memory) would wait for tasks forever: the
    pool's queues stay open in every worker. A watchdog thread ends it once its parent is gone.
    """
    global _loader
    _loader = config.build()
    warm_up(store)
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watchdog").start()
    if ready is not None:
        ready.release()


def _exit_with_parent(parent: int, interval_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(1)


@dataclass(frozen=True)
class SharedBatch:
    """Where a worker leaves a decoded batch: batch ``index`` of the shared-memory array ``name``
    of ``shape`` (batches, batch size, 3, crop, crop), float32. Decoded pixels then cross to the
    main process without being pickled, copied through a pipe and unpickled."""

    name: str
    index: int
    shape: tuple[int, ...]

    def view(self, shm: shared_memory.SharedMemory) -> np.ndarray:
        return np.ndarray(self.shape, dtype=np.float32, buffer=shm.buf)[self.index]


_segments: dict[str, shared_memory.SharedMemory] = {}


def decode_in_worker(paths: Sequence[str], target: SharedBatch | None) -> Decoded:
    """Decode ``paths`` into ``target``; the returned ``pixels`` is then empty (the main process
    reads ``ok.sum()`` images from the shared batch). Without a target the pixels travel back
    through the pool's pipe (pickled)."""
    if _loader is None:
        raise RuntimeError("decode worker used before init_worker")
    if target is None:
        return decode_chunk(_loader, paths)
    shm = _segments.get(target.name)
    if shm is None:
        shm = _segments[target.name] = shared_memory.SharedMemory(name=target.name)
    decoded = decode_chunk(_loader, paths, target.view(shm))
    decoded.pixels = decoded.pixels[:0].copy()
    return decoded

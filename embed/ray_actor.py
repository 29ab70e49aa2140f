"""The Ray engine's actor (:class:`ShardEmbedder`): embeds whole shards on a Ray node."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import output as out_
from .decode import Decoded, LoaderConfig, decode_chunk
from .reads import read_ahead, warm_up


@dataclass
class _Rows:
    """One shard's results as columns, one row per input (failed ones with an error)."""

    n: int
    features: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kinds = np.full(self.n, "", dtype=object)
        self.errors = np.full(self.n, "", dtype=object)
        self.decode_s, self.infer_s = np.zeros(self.n), np.zeros(self.n)


def _model_bytes(model_path: str, sha256: str, model_ref: list[Any] | None) -> bytes:
    """The graph's bytes, checked against ``sha256`` as read (what is checked is what runs): from
    the driver's file where this node sees it, else from Ray's object store, kept once per node
    under the temporary folder."""
    from models.files import write_atomic

    def read_checked(path: Path) -> bytes | None:
        data = path.read_bytes() if path.is_file() else None
        return data if data is not None and hashlib.sha256(data).hexdigest() == sha256 else None

    path = Path(model_path)
    if (data := read_checked(path)) is not None:
        return data
    if model_ref is None:
        if not path.is_file():
            raise RuntimeError(f"{model_path} is not visible on this Ray node")
        raise RuntimeError(f"{model_path} does not match the sha256 its version records")
    local = Path(tempfile.gettempdir()) / "backbones-models" / f"{sha256}.onnx"
    if (data := read_checked(local)) is not None:
        return data
    import ray

    data = ray.get(model_ref[0])
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError("the model file sent through Ray does not match the sha256 its version records")
    local.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(local, data)
    return data


class ShardEmbedder:
    """Ray actor: embeds whole shards. One ONNX Runtime session (:class:`models.runtime.OnnxSession`)
    over the version's ``model.onnx`` (checked against its sha256); ``decode_threads`` threads
    decode the next batches while ORT runs on the current one (Pillow and NumPy release the GIL).
    ``runners`` > 1: each batch runs as micro-batches, that many calls at once
    (:class:`models.runtime.ConcurrentRunner`, as the local engine does on a CPU).
    ``model_ref``: ``[ObjectRef]`` of the model file's bytes, for nodes that cannot see
    ``model_path``. Paths may be object URLs (``store``: one of them): the decode threads read
    their bytes."""

    def __init__(
        self,
        model_path: str,
        sha256: str,
        config: LoaderConfig,
        batch_size: int,
        threads: int,
        decode_threads: int,
        top_k: int | None,
        runners: int = 1,
        model_ref: list[Any] | None = None,
        store: str | None = None,
    ) -> None:
        from models.runtime import ConcurrentRunner, OnnxSession

        warm_up(store)
        self.session = OnnxSession(_model_bytes(model_path, sha256, model_ref), threads=threads)
        self.runner = ConcurrentRunner(self.session.run, runners)
        self.loader = config.build()
        self.batch_size = batch_size
        self.decode_threads = max(0, decode_threads)
        self.pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads else None
        self.top_k = top_k
        self.ready_at = time.time()  # wall clock: the driver separates actor start-up from work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        rows = _Rows(len(paths))
        for (a, b), decoded in self._decoded(paths):
            t0 = time.perf_counter()
            if len(decoded.pixels):
                outputs = self.runner.run(decoded.pixels)
                rows.features.append(outputs.features)
                if self.top_k:
                    rows.logits.append(outputs.logits)
            rows.infer_s[a:b] = (time.perf_counter() - t0) / (b - a)
            rows.decode_s[a:b] = decoded.seconds / (b - a)
            for i, (kind, message) in decoded.errors.items():
                rows.kinds[a + i], rows.errors[a + i] = kind, message
        return self._columns(batch, rows)

    def _decode(self, paths: Sequence[str]) -> Future[Decoded] | Decoded:
        if self.pool is None:
            return decode_chunk(self.loader, paths)
        # the batch's first objects are requested now, while the batches before it decode
        return self.pool.submit(decode_chunk, self.loader, paths, None, read_ahead(paths))

    def _decoded(self, paths: Sequence[str]) -> Iterator[tuple[tuple[int, int], Decoded]]:
        """Each batch's span and decoded images, in order, with the next batches decoding ahead."""
        n = len(paths)
        todo = iter([(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)])
        pending: deque[tuple[tuple[int, int], Future[Decoded] | Decoded]] = deque()
        for span in todo:
            pending.append((span, self._decode(paths[span[0] : span[1]])))
            if len(pending) >= 2 * max(1, self.decode_threads):
                break
        while pending:
            span, item = pending.popleft()
            decoded = item.result() if isinstance(item, Future) else item
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, self._decode(paths[nxt[0] : nxt[1]])))
            yield span, decoded

    def _columns(self, batch: dict[str, np.ndarray], rows: _Rows) -> dict[str, np.ndarray]:
        """The input columns plus the results, as Ray returns them to the datasink."""
        ok = rows.errors == ""
        dim = rows.features[0].shape[1] if rows.features else 0
        embedding = np.zeros((rows.n, dim), dtype=np.float32)
        if rows.features:
            embedding[ok] = np.concatenate(rows.features)
        result = {k: batch[k] for k in ("shard", "pos", "id", "path")}
        result.update(
            kind=rows.kinds, error=rows.errors, decode_s=rows.decode_s, infer_s=rows.infer_s, embedding=embedding
        )
        result["ready_at"] = np.full(rows.n, self.ready_at)
        if self.top_k:
            k = min(self.top_k, rows.logits[0].shape[1]) if rows.logits else self.top_k
            idx, score = np.zeros((rows.n, k), dtype=np.int32), np.zeros((rows.n, k), dtype=np.float32)
            if rows.logits:
                idx[ok], score[ok] = out_.top_k_arrays(np.concatenate(rows.logits), k)
            result.update(topk_index=idx, topk_score=score)
        return result

"""The Ray engine: the same job on Ray Data, on one machine or a cluster.

    one block per shard still to do: rows (shard, pos, id, path), in input order
      -> map_batches(ShardEmbedder, batch_size=None)   actors, on CPUs or GPUs: per shard, decode
                                                      with the version's ImageLoader in threads
                                                      ahead of ONNX Runtime (OnnxSession)
      -> write_datasink(ShardDatasink)                 Ray workers write part-NNNNN.parquet

A shard is the unit of work from input to file, so that finished shards are written while the
others are computed and a killed job resumes where it stopped, as with the local engine. (A
separate decode stage would cut shards into batches that Ray regroups at will; Ray's streaming
repartition can restore them, but only writes once the whole input has passed.) Should Ray still
split a shard across write tasks, its pieces go to ``_fragments/`` and the driver joins them.

The shard plan, the Parquet schema and the writing code are the local engine's, so both engines
write the same files and a job started with one can be resumed with the other. On a cluster,
the images, the registry (BENTOML_HOME) and the output folder must be on storage every node
mounts at the same path.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from models.errors import BackbonesError
from models.spec import ONNX_FILENAME

from . import output as out_
from .decode import Decoded, LoaderConfig, decode_chunk
from .ray_sink import ShardLayout, datasink_class

if TYPE_CHECKING:
    from .job import EmbedJob, EngineStats, Shard

log = logging.getLogger(__name__)


class RayEngineError(BackbonesError):
    """Ray is missing, cannot start or connect, or the job failed on the cluster."""


def _first_line(e: BaseException) -> str:
    """The message of the innermost error Ray wraps (its own text is a traceback)."""
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


class ShardEmbedder:
    """Ray actor: embeds whole shards. One ONNX Runtime session (:class:`models.runtime.OnnxSession`)
    over the version's ``model.onnx`` (checked against its sha256); ``decode_threads`` threads
    decode the next batches while ORT runs on the current one (Pillow and NumPy release the GIL).
    ``runners`` > 1: each batch runs as micro-batches, that many single-threaded calls at once
    (as the local engine does on a CPU)."""

    def __init__(
        self,
        model_path: str,
        sha256: str,
        config: LoaderConfig,
        batch_size: int,
        threads: int | None,
        decode_threads: int,
        top_k: int | None,
        runners: int = 1,
    ) -> None:
        from models.registry import sha256_file
        from models.runtime import OnnxSession

        from .local import ConcurrentRunner

        path = Path(model_path)
        if not path.is_file():
            raise RuntimeError(
                f"{model_path} is not visible on this Ray node; put the registry (BENTOML_HOME) on storage "
                "that every node mounts at the same path"
            )
        if sha256_file(path) != sha256:
            raise RuntimeError(f"{model_path} does not match the sha256 its version records")
        self.session = OnnxSession(path, threads=1 if runners > 1 else threads)
        self.runner = ConcurrentRunner(self.session.run, runners)
        self.loader = config.build()
        self.batch_size = batch_size
        self.decode_threads = max(0, decode_threads)
        self.pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads else None
        self.top_k = top_k
        self.ready_at = time.time()  # wall clock: the driver separates actor start-up from work

    def _decode(self, paths: Sequence[str]) -> Future[Decoded] | Decoded:
        if self.pool is None:
            return decode_chunk(self.loader, paths)
        return self.pool.submit(decode_chunk, self.loader, paths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        spans = [(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)]
        pending: deque[tuple[tuple[int, int], Future[Decoded] | Decoded]] = deque()
        todo = iter(spans)
        for span in todo:
            pending.append((span, self._decode(paths[span[0] : span[1]])))
            if len(pending) >= 2 * max(1, self.decode_threads):
                break
        kinds = np.full(n, "", dtype=object)
        errors = np.full(n, "", dtype=object)
        decode_s, infer_s = np.zeros(n), np.zeros(n)
        features: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        while pending:
            (a, b), item = pending.popleft()
            decoded = item.result() if isinstance(item, Future) else item
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, self._decode(paths[nxt[0] : nxt[1]])))
            t0 = time.perf_counter()
            if len(decoded.pixels):
                outputs = self.runner.run(decoded.pixels)
                features.append(outputs.features)
                if self.top_k:
                    logits.append(outputs.logits)
            infer_s[a:b] = (time.perf_counter() - t0) / (b - a)
            decode_s[a:b] = decoded.seconds / (b - a)
            for i, (kind, message) in decoded.errors.items():
                kinds[a + i], errors[a + i] = kind, message
        ok = errors == ""
        dim = features[0].shape[1] if features else 0
        embedding = np.zeros((n, dim), dtype=np.float32)
        if features:
            embedding[ok] = np.concatenate(features)
        result = {k: batch[k] for k in ("shard", "pos", "id", "path")}
        result.update(kind=kinds, error=errors, decode_s=decode_s, infer_s=infer_s, embedding=embedding)
        result["ready_at"] = np.full(n, self.ready_at)
        if self.top_k:
            k = min(self.top_k, logits[0].shape[1]) if logits else self.top_k
            idx, score = np.zeros((n, k), dtype=np.int32), np.zeros((n, k), dtype=np.float32)
            if logits:
                idx[ok], score[ok] = out_.top_k_arrays(np.concatenate(logits), k)
            result.update(topk_index=idx, topk_score=score)
        return result


def init_local_ray(num_cpus: int | None = None, *, logging_level: int = logging.WARNING) -> None:
    """Start a Ray on this machine whose workers run this Python environment as it is.

    Ray's ``uv run`` integration would otherwise give every worker a fresh copy of the project
    environment, built anew for each Ray session (a minute or more here). On a cluster
    (``--ray-address``) that integration stays on: it is how the workers get the dependencies.
    """
    import ray
    from ray._private import ray_constants

    if hasattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV"):
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging_level)


@dataclass(frozen=True)
class RayPlan:
    """How the actors use a node: ``actors`` of ``cpus`` CPUs (and ``gpus`` GPUs) each, with
    ``threads`` ONNX Runtime threads per call, ``runners`` calls at once and ``decode_threads``
    decode threads."""

    actors: int
    cpus: float
    gpus: float
    threads: int
    decode_threads: int
    runners: int = 1


def plan_actors(
    resources: dict[str, float],
    *,
    actors: int | None,
    gpus_per_actor: float,
    threads: int | None,
    workers: int | None,
) -> RayPlan:
    """Defaults: with GPUs, one actor per ``gpus_per_actor`` GPUs with 4 decode threads and one
    ORT thread; on CPUs, one actor per 2 CPUs, each decoding in one thread and running ORT on
    two single-threaded calls at once on micro-batches (``threads`` given: one call on that many
    threads), the mix that measured best on 2 cores (docs/benchmarks.md)."""
    if gpus_per_actor > 0:
        n = actors or max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor))
        decode = 4 if workers is None else workers
        return RayPlan(n, float(max(1, decode)), gpus_per_actor, threads or 1, decode)
    cpus = float(resources.get("CPU", 1))
    n = actors or max(1, int(cpus) // 2)
    decode = 1 if workers is None else workers
    # leave a little CPU unclaimed: the write tasks must run while the actors live
    cpu_share = min(1.0, max(0.1, (cpus - 0.25) / n))
    if threads is None:
        return RayPlan(n, cpu_share, 0.0, 1, decode, runners=2)
    return RayPlan(n, cpu_share, 0.0, threads, decode)


def run_ray(
    job: EmbedJob,
    todo: Sequence[Shard],
    *,
    batch_size: int = 32,
    address: str | None = None,
    progress: bool = False,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    threads: int | None = None,
    workers: int | None = None,
) -> tuple[list[out_.ShardRecord], EngineStats]:
    """Compute the shards ``todo`` on Ray Data. Uses the Ray already initialised in this process,
    else starts one (``address``: a cluster to join; none: a local Ray on this machine).

    ``actors`` / ``threads`` / ``workers``: ONNX Runtime actors, ORT threads per actor and decode
    threads per actor (defaults: :func:`plan_actors`).
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError("--engine ray needs Ray Data: uv add 'ray[data]'") from None

    from .job import EngineStats

    stats = EngineStats()
    if not todo:
        return [], stats
    t_start = time.perf_counter()
    quiet = not log.isEnabledFor(logging.INFO)  # Ray's own INFO and WARNING lines only with -v
    if quiet:
        import ray.data  # configures its loggers: a file under the session folder and the console

        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    level = logging.ERROR if quiet else logging.INFO
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, logging_level=level)
            else:
                init_local_ray(logging_level=level)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise RayEngineError(f"cannot start {where}: {_first_line(e)}") from None
    elif address:
        log.warning("Ray is already initialised in this process; --ray-address %s is not used", address)
    try:
        plan = plan_actors(
            ray.cluster_resources(), actors=actors, gpus_per_actor=gpus_per_actor, threads=threads, workers=workers
        )
        stats.workers, stats.threads, stats.runners = plan.actors, plan.threads, plan.runners
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        layout = ShardLayout(
            output=str(job.output.resolve()),
            dim=job.spec.feature_dim,
            top_k=job.top_k,
            labels=list(job.spec.labels),
            metadata={k.decode(): v.decode() for k, v in (job.schema.metadata or {}).items()},
            bounds={s.index: (s.start, s.stop) for s in todo},
        )
        blocks = [
            pa.table(
                {
                    "shard": pa.array([s.index] * s.size, pa.int32()),
                    "pos": pa.array(range(s.start, s.stop), pa.int64()),
                    "id": pa.array([it.id for it in job.items[s.start : s.stop]], pa.string()),
                    "path": pa.array([it.path for it in job.items[s.start : s.stop]], pa.string()),
                }
            )
            for s in todo
        ]
        from ray.data import ActorPoolStrategy

        ds = ray.data.from_arrow(blocks).map_batches(
            ShardEmbedder,
            fn_constructor_kwargs={
                "model_path": str(job.stored.file(ONNX_FILENAME).resolve()),
                "sha256": job.spec.files[ONNX_FILENAME],
                "config": job.loader_config,
                "batch_size": batch_size,
                "threads": plan.threads,
                "decode_threads": plan.decode_threads,
                "top_k": job.top_k,
                "runners": plan.runners,
            },
            batch_size=None,  # one call per block = per shard
            batch_format="numpy",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus,
            num_gpus=plan.gpus or None,
        )
        sink = datasink_class()(layout)
        stats.startup_s = time.perf_counter() - t_start
        t_run = time.time()
        # writing is light: it must not wait for a CPU that the actors hold
        try:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1})
        except ray.exceptions.RayError as e:
            log.debug("the Ray job failed", exc_info=True)
            raise RayEngineError(
                f"the Ray job failed: {_first_line(e)}; finished shards are kept: run the same command to resume"
            ) from None
        # the run starts when the first actor is ready: starting actors (imports, session) is start-up
        ready = min([r.pop("ready_at") for r in sink.records] or [t_run])
        stats.startup_s += max(0.0, ready - t_run)
        stats.run_s = time.time() - max(ready, t_run)
    finally:
        if started_here:
            ray.shutdown()
    records = sorted((out_.ShardRecord(**r) for r in sink.records), key=lambda r: r.shard)
    missing = sorted({s.index for s in todo} - {r.shard for r in records})
    if missing:
        raise RuntimeError(f"Ray finished without writing shard(s) {missing[:10]}")
    stats.images = sum(r.stop - r.start for r in records)
    stats.decode_s = sum(r.decode_s for r in records)
    stats.infer_s = sum(r.infer_s for r in records)
    log.debug("ray plan %s", json.dumps(plan.__dict__))
    return records, stats

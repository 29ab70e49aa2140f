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
write the same files and a job started with one can be resumed with the other.

On a cluster nothing needs a shared file system when the images and the output are in an object
store (``s3://``): the actors read the images' bytes and the write tasks write whole objects
themselves, each with its own file system instance and the credentials of its node's
environment (nothing secret is shipped by the driver). The model file travels through Ray's
object store to nodes that cannot see the driver's registry. Local paths must be on storage that
every node mounts at the same path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from models.cores import batch_plan, ort_layout
from models.errors import BackbonesError
from models.spec import ONNX_FILENAME
from models.storage import first_url, is_url

from . import output as out_
from .config import RAY_CPUS_PER_ACTOR, RAY_GPU_DECODE_THREADS
from .ray_actor import ShardEmbedder
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
    """Defaults: with GPUs, one actor per ``gpus_per_actor`` GPUs with
    :data:`~embed.config.RAY_GPU_DECODE_THREADS` decode threads and one ONNX Runtime call; on
    CPUs, one actor per :data:`~embed.config.RAY_CPUS_PER_ACTOR` CPUs, each laid out as the local
    engine lays out that many cores (:func:`models.cores.batch_plan`). ``workers``: decode
    threads per actor; ``threads``: one call on that many threads."""
    if gpus_per_actor > 0:
        n = actors or max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor))
        decode = RAY_GPU_DECODE_THREADS if workers is None else workers
        call = ort_layout(1, gpu=True, threads=threads or 0)
        return RayPlan(n, float(max(1, decode)), gpus_per_actor, call.threads, decode, call.runners)
    cpus = float(resources.get("CPU", 1))
    n = actors or max(1, int(cpus) // RAY_CPUS_PER_ACTOR)
    each = batch_plan(RAY_CPUS_PER_ACTOR, gpu=False, workers=workers, threads=threads)
    # leave a little CPU unclaimed: the write tasks must run while the actors live
    cpu_share = min(1.0, max(0.1, (cpus - 0.25) / n))
    return RayPlan(n, cpu_share, 0.0, each.threads, each.workers, each.runners)


def run_ray(
    job: EmbedJob, todo: Sequence[Shard], *, progress: bool = False
) -> tuple[list[out_.ShardRecord], EngineStats]:
    """Compute the shards ``todo`` on Ray Data. Uses the Ray already initialised in this process,
    else starts one (``job.config.ray_address``: a cluster to join; none: a local Ray on this
    machine). The actors are laid out by :func:`plan_actors`."""
    from .job import EngineStats

    ray = _import_ray()
    stats = EngineStats()
    if not todo:
        return [], stats
    _preflight(job)
    t_start = time.perf_counter()
    started_here = _connect(ray, job.config.ray_address)
    try:
        cfg = job.config
        plan = plan_actors(
            ray.cluster_resources(),
            actors=cfg.ray_actors,
            gpus_per_actor=cfg.ray_gpus,
            threads=cfg.threads,
            workers=cfg.workers,
        )
        stats.workers, stats.threads, stats.runners = plan.actors, plan.threads, plan.runners
        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = _dataset(ray, job, todo, plan)
        sink = datasink_class()(_layout(job, todo))
        stats.startup_s = time.perf_counter() - t_start
        t_run = time.time()
        _write(ray, ds, sink)
        # the run starts when the first actor is ready: starting actors (imports, session) is start-up
        ready = min([r.pop("ready_at") for r in sink.records] or [t_run])
        stats.startup_s += max(0.0, ready - t_run)
        stats.run_s = time.time() - max(ready, t_run)
    finally:
        if started_here:
            ray.shutdown()
    records = _records(sink.records, todo, stats)
    log.debug("ray plan %s", json.dumps(plan.__dict__))
    return records, stats


def _preflight(job: EmbedJob) -> None:
    """The check every consumer of a version runs (models.inference.open_version), here on the
    driver with the providers its settings give: the actors then load the bytes whose sha256 the
    spec records (embed/ray_actor.py)."""
    from models import get_settings
    from models.inference import PREFLIGHT_DIR, check_version
    from models.registry import Registry

    settings = get_settings()
    check_version(job.stored, settings=settings, memo_dir=Registry(settings=settings).own_dir(PREFLIGHT_DIR))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # configures its loggers: a file under the session folder and the console
    except ImportError:
        raise RayEngineError("--engine ray needs Ray Data: uv add 'ray[data]'") from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` or start a local Ray, unless this process has one; True if started here.
    Ray's own INFO and WARNING lines only with -v."""
    quiet = not log.isEnabledFor(logging.INFO)
    if quiet:
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    level = logging.ERROR if quiet else logging.INFO
    if ray.is_initialized():
        if address:
            log.warning("Ray is already initialised in this process; --ray-address %s is not used", address)
        return False
    try:
        if address:
            ray.init(address=address, logging_level=level)
        else:
            init_local_ray(logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayEngineError(f"cannot start {where}: {_first_line(e)}") from None
    return True


def _layout(job: EmbedJob, todo: Sequence[Shard]) -> ShardLayout:
    where = job.output.location
    return ShardLayout(
        output=where if is_url(where) else str(Path(where).resolve()),
        dim=job.spec.feature_dim,
        top_k=job.config.top_k,
        labels=list(job.spec.labels),
        metadata={k.decode(): v.decode() for k, v in (job.schema.metadata or {}).items()},
        bounds={s.index: (s.start, s.stop) for s in todo},
    )


def _dataset(ray: Any, job: EmbedJob, todo: Sequence[Shard], plan: RayPlan) -> Any:
    """One block per shard, rows (shard, pos, id, path) in input order, mapped by the actors."""
    from ray.data import ActorPoolStrategy

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
    model = job.stored.file(ONNX_FILENAME).resolve()
    return ray.data.from_arrow(blocks).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={
            "model_path": str(model),
            "sha256": job.spec.files[ONNX_FILENAME],
            "config": job.loader_config,
            "batch_size": job.config.batch_size,
            "threads": plan.threads,
            "decode_threads": plan.decode_threads,
            "top_k": job.config.top_k,
            "runners": plan.runners,
            "model_ref": _model_ref(ray, model),
            "store": first_url([it.path for s in todo for it in job.items[s.start : s.stop]]),
        },
        batch_size=None,  # one call per block = per shard
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus,
        num_gpus=plan.gpus or None,
    )


def _model_ref(ray: Any, model: Path) -> list[Any] | None:
    """The model file in Ray's object store when the cluster has other nodes (which may not see
    the registry), in a list so that actors fetch it only if they need it."""
    if sum(1 for node in ray.nodes() if node.get("Alive")) <= 1:
        return None
    return [ray.put(model.read_bytes())]


def _write(ray: Any, ds: Any, sink: Any) -> None:
    # writing is light: it must not wait for a CPU that the actors hold
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1})
    except ray.exceptions.RayError as e:
        log.debug("the Ray job failed", exc_info=True)
        raise RayEngineError(f"the Ray job failed: {_first_line(e)}") from None


def _records(found: list[dict[str, Any]], todo: Sequence[Shard], stats: EngineStats) -> list[out_.ShardRecord]:
    """The sink's shard records, in shard order, with their counts and times added to ``stats``."""
    records = sorted((out_.ShardRecord(**r) for r in found), key=lambda r: r.shard)
    missing = sorted({s.index for s in todo} - {r.shard for r in records})
    if missing:
        raise RuntimeError(f"Ray finished without writing shard(s) {missing[:10]}")
    stats.images = sum(r.stop - r.start for r in records)
    stats.decode_s = sum(r.decode_s for r in records)
    stats.infer_s = sum(r.infer_s for r in records)
    return records

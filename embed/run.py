"""The batch job's entry: collect the inputs, resolve the model version, plan the shards, run an
engine over the shards still to compute, and write the manifest (see :mod:`embed.job`).

A job that fails once it has started (a full disk, an output it may not write, an object store
that stops answering, a dead worker) is marked ``failed`` in its manifest with the reason, keeps
its finished shards, and resumes when the same command is run again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import Registry
from models.errors import BackbonesError
from models.export import ensure_version

from . import output as out_
from .config import EmbedConfig
from .inputs import collect_inputs
from .job import EmbedJob, EmbedSummary, EngineStats, Shard
from .job_output import open_output

log = logging.getLogger(__name__)


def run_embed(
    ref: str,
    inputs: Sequence[str],
    output: Path | str,
    config: EmbedConfig | None = None,
    *,
    registry: Registry | None = None,
    **options: Any,
) -> EmbedSummary:
    """Embed ``inputs`` with model ``ref`` into Parquet shards under ``output`` (a folder or an
    ``s3://bucket/prefix``), resuming a job that was interrupted there. ``options``: fields of
    :class:`EmbedConfig` that replace ``config``'s (``run_embed(ref, inputs, out, batch_size=8)``)."""
    config = EmbedConfig.model_validate({**(config or EmbedConfig()).model_dump(), **options})
    items = collect_inputs(inputs, path_column=config.path_column, id_column=config.id_column)  # before the model
    stored = ensure_version(ref, registry or Registry())
    out = open_output(output)
    out.create()
    job = EmbedJob(stored, items, out, config)
    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    with out.lock():
        existing = out.prepare(job.identity(), overwrite=config.overwrite)
        runs: list[dict[str, Any]] = list(existing.get("runs", [])) if existing else []
        done = out.finished([s.index for s in job.shards])
        todo = [s for s in job.shards if s.index not in done]
        out.write_manifest(job.manifest("running", list(done.values()), runs))
        log.info("%s: %d inputs in %d shards, %d to compute", out.location, len(items), len(job.shards), len(todo))
        earlier = list(runs)
        try:
            records, stats = _run_engine(job, todo)
            all_records = sorted([*done.values(), *records], key=lambda r: r.shard)
            errors = out.merge_errors(all_records)
            seconds = time.perf_counter() - t_start
            runs.append(
                {
                    "started_at": started,
                    "engine": config.engine,
                    "shards_computed": len(records),
                    "images_computed": stats.images,
                    "seconds": round(seconds, 3),
                    "stats": asdict(stats),
                }
            )
            status = "complete" if len(all_records) == len(job.shards) else "incomplete"
            out.write_manifest(job.manifest(status, all_records, runs))
        except BackbonesError as e:
            raise _failed(
                job, [*earlier, {"started_at": started, "engine": config.engine, "failed": str(e)}], e
            ) from None
    return EmbedSummary(
        output=out.location,
        model=job.spec.tag,
        engine=config.engine,
        dim=job.spec.feature_dim,
        inputs=len(items),
        embedded=sum(r.rows for r in all_records),
        errors=errors,
        shards=len(job.shards),
        shards_computed=len(records),
        shards_skipped=len(done),
        images_computed=stats.images,
        seconds=seconds,
        images_per_s=stats.images / stats.run_s if stats.run_s > 0 else 0.0,
        stats=stats,
    )


def _failed(job: EmbedJob, runs: list[dict[str, Any]], error: BackbonesError) -> BackbonesError:
    """Mark the job failed in its manifest (if the output still takes it) and return ``error``
    telling what is kept and how to resume."""
    finished: dict[int, out_.ShardRecord] = {}
    try:
        finished = job.output.finished([s.index for s in job.shards])
        job.output.write_manifest({**job.manifest("failed", list(finished.values()), runs), "error": str(error)})
    except BackbonesError as e:
        log.warning("could not mark the job failed in its manifest: %s", e)
    error.args = (
        f"{error}; the {len(finished)} finished shard(s) of {len(job.shards)} are kept: "
        "run the same command again to resume",
    )
    return error


def _run_engine(job: EmbedJob, todo: Sequence[Shard]) -> tuple[list[out_.ShardRecord], EngineStats]:
    """The shards ``todo`` computed by the job's engine, with progress shown as the job asks
    (None: when stderr is a terminal)."""
    progress = job.config.progress
    if job.config.engine == "ray":
        from .ray_engine import run_ray

        return run_ray(job, todo, progress=sys.stderr.isatty() if progress is None else progress)
    from .local import run_local

    bar = _progress_bar(sum(s.size for s in todo), progress)
    try:
        return run_local(job, todo, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is False or total == 0 or (enabled is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

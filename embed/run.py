"""The batch job's entry: collect the inputs, resolve the model version, plan the shards, run an
engine over the shards still to compute, and write the manifest (see :mod:`embed.job`)."""

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
from models.export import ensure_version

from . import output as out_
from .config import EmbedConfig
from .inputs import collect_inputs
from .job import EmbedJob, EmbedSummary, EngineStats, Shard

log = logging.getLogger(__name__)


def run_embed(
    ref: str,
    inputs: Sequence[str],
    output: Path,
    config: EmbedConfig | None = None,
    *,
    registry: Registry | None = None,
    **options: Any,
) -> EmbedSummary:
    """Embed ``inputs`` with model ``ref`` into Parquet shards under ``output``, resuming a job
    that was interrupted there. ``options``: fields of :class:`EmbedConfig` that replace
    ``config``'s (``run_embed(ref, inputs, out, batch_size=8)``)."""
    config = EmbedConfig.model_validate({**(config or EmbedConfig()).model_dump(), **options})
    items = collect_inputs(inputs, path_column=config.path_column, id_column=config.id_column)  # before the model
    stored = ensure_version(ref, registry or Registry())
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise out_.OutputError(f"--output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    job = EmbedJob(stored, items, output, config)
    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    with out_.job_lock(output):
        existing = out_.prepare_output(output, job.identity(), overwrite=config.overwrite)
        runs: list[dict[str, Any]] = list(existing.get("runs", [])) if existing else []
        done = {s.index: r for s in job.shards if (r := out_.read_record(output, s.index)) is not None}
        todo = [s for s in job.shards if s.index not in done]
        out_.write_manifest(output, job.manifest("running", list(done.values()), runs))
        log.info("%s: %d inputs in %d shards, %d to compute", output, len(items), len(job.shards), len(todo))
        records, stats = _run_engine(job, todo)
        all_records = sorted([*done.values(), *records], key=lambda r: r.shard)
        errors = out_.merge_errors(output, all_records)
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
        out_.write_manifest(output, job.manifest(status, all_records, runs))
    return EmbedSummary(
        output=str(output),
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

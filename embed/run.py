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

from models import Registry, StoredVersion
from models.errors import UnknownModelError

from . import output as out_
from .inputs import collect_inputs
from .job import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, EmbedJob, EmbedSummary, Engine

log = logging.getLogger(__name__)


def load_version(ref: str, registry: Registry | None = None) -> StoredVersion:
    """The version ``ref`` names (checked); a catalog name with no version yet is exported first."""
    registry = registry or Registry()
    try:
        return registry.get(ref)
    except UnknownModelError:
        from models.export import ensure_version  # needs PyTorch: only for a first export

        return ensure_version(ref, registry)


# -- the job -----------------------------------------------------------------------------------


def run_embed(
    ref: str,
    inputs: Sequence[str],
    output: Path,
    *,
    engine: Engine = "local",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    threads: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    top_k: int | None = None,
    overwrite: bool = False,
    ray_address: str | None = None,
    ray_options: dict[str, Any] | None = None,
    progress: bool | None = None,
    registry: Registry | None = None,
    path_column: str = "path",
    id_column: str = "id",
) -> EmbedSummary:
    """Embed ``inputs`` with model ``ref`` into Parquet shards under ``output``, resuming a job
    that was interrupted there. ``progress``: a tqdm bar on stderr (None: when it is a terminal)."""
    items = collect_inputs(inputs, path_column=path_column, id_column=id_column)  # fail fast, before the model
    stored = load_version(ref, registry)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise out_.OutputError(f"--output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    job = EmbedJob(stored, items, output, shard_size=shard_size, top_k=top_k)
    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat()
    with out_.job_lock(output):
        existing = out_.prepare_output(output, job.identity(), overwrite=overwrite)
        runs: list[dict[str, Any]] = list(existing.get("runs", [])) if existing else []
        done = {s.index: r for s in job.shards if (r := out_.read_record(output, s.index)) is not None}
        todo = [s for s in job.shards if s.index not in done]
        out_.write_manifest(output, job.manifest("running", list(done.values()), runs))
        log.info("%s: %d inputs in %d shards, %d to compute", output, len(items), len(job.shards), len(todo))
        if engine == "ray":
            from .ray_engine import run_ray

            show = sys.stderr.isatty() if progress is None else progress
            records, stats = run_ray(
                job,
                todo,
                batch_size=batch_size,
                workers=workers,
                threads=threads,
                address=ray_address,
                progress=show,
                **(ray_options or {}),
            )
        else:
            from .local import run_local

            bar = _progress_bar(sum(s.size for s in todo), progress)
            try:
                records, stats = run_local(
                    job, todo, batch_size=batch_size, workers=workers, threads=threads, progress=bar
                )
            finally:
                if bar is not None:
                    bar.close()
        all_records = sorted([*done.values(), *records], key=lambda r: r.shard)
        errors = out_.merge_errors(output, all_records)
        seconds = time.perf_counter() - t_start
        runs.append(
            {
                "started_at": started,
                "engine": engine,
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
        engine=engine,
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


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is False or total == 0 or (enabled is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

"""``backbones embed``: image collections -> Parquet shards of feature vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import echo_json, handle_errors


@click.command("embed")
@click.argument("ref")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for part-*.parquet, _manifest.json and _errors.jsonl (created if missing).",
)
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096), help="Images per ONNX Runtime call."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Decode processes (0: decode in the main process); with --engine ray, decode threads per actor. "
    "Default: half the cores on CPU, all with a GPU (ray: 1 per actor, 4 with a GPU).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="ONNX Runtime intra-op threads (ray: per actor). Default (local, CPU): one single-threaded call per "
    "core at once, measured fastest; with a GPU one call. Ray default: 2, 1 with a GPU.",
)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("-k", "--top-k", type=click.IntRange(min=1), help="Also store the K most probable classes per image.")
@click.option(
    "--shard-size", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per Parquet file."
)
@click.option("--overwrite", is_flag=True, help="Delete what an earlier job wrote to --output and start over.")
@click.option("--ray-address", metavar="ADDR", help="Ray cluster to run on (--engine ray). Default: a local Ray.")
@click.option(
    "--ray-actors", type=click.IntRange(min=1), help="ONNX Runtime actors (--engine ray). Default: 1 per GPU, else 1."
)
@click.option(
    "--ray-gpus", type=click.FloatRange(min=0), default=0, show_default=True, help="GPUs per actor (--engine ray)."
)
@click.option("--path-column", default="path", show_default=True, help="Manifest column with the image paths.")
@click.option("--id-column", default="id", show_default=True, help="Manifest column with the ids (optional).")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar on stderr. Default: when stderr is a terminal."
)
@click.option("--json", "as_json", is_flag=True, help="Print only the final summary, as JSON.")
@handle_errors
def embed_cmd(
    ref: str,
    inputs: tuple[str, ...],
    output: Path,
    batch_size: int,
    workers: int | None,
    threads: int | None,
    engine: str,
    top_k: int | None,
    shard_size: int,
    overwrite: bool,
    ray_address: str | None,
    ray_actors: int | None,
    ray_gpus: float,
    path_column: str,
    id_column: str,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Embed images with model REF into Parquet shards under --output.

    INPUT: image files, folders (searched recursively), globs ('shots/**/*.jpg', quoted) and
    manifests (.csv, .parquet, .jsonl) with a 'path' column and an optional 'id' column;
    relative manifest paths are relative to the manifest. Order is deterministic; the id of an
    image is the manifest's id, else its path.

    Each part-NNNNN.parquet holds id, path, embedding (float32 x the model's feature size) and,
    with --top-k, predictions. Unreadable images go to _errors.jsonl and do not stop the job.
    Running the same command again resumes: finished shards are kept, the rest is computed.
    Read the folder as one dataset: pyarrow.dataset.dataset(DIR), pandas.read_parquet(DIR),
    polars.read_parquet('DIR/*.parquet'), DuckDB 'DIR/*.parquet', spark.read.parquet(DIR).
    """
    from embed import run_embed

    if engine != "ray" and (ray_address or ray_actors or ray_gpus):
        raise click.UsageError("--ray-address, --ray-actors and --ray-gpus need --engine ray")
    ray_options: dict[str, Any] = {"actors": ray_actors, "gpus_per_actor": ray_gpus}
    summary = run_embed(
        ref,
        inputs,
        output,
        engine=engine,  # type: ignore[arg-type]
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        shard_size=shard_size,
        top_k=top_k,
        overwrite=overwrite,
        ray_address=ray_address,
        ray_options=ray_options,
        progress=progress,
        path_column=path_column,
        id_column=id_column,
    )
    if as_json:
        echo_json(summary.to_dict())
        return
    s, st = summary, summary.stats
    click.echo(
        f"{s.embedded} of {s.inputs} images embedded with {s.model} (dim {s.dim}) into {s.output}: "
        f"{s.shards} shard(s), {s.shards_computed} computed now, {s.shards_skipped} already done"
    )
    if s.errors:
        click.echo(f"{s.errors} image(s) could not be read: see {Path(s.output) / '_errors.jsonl'}")
    if s.images_computed and s.engine == "ray":
        click.echo(
            f"{s.images_computed} images in {st.run_s:.1f} s ({s.images_per_s:.0f} img/s; {s.seconds:.1f} s in all, "
            f"{st.startup_s:.1f} s of it starting Ray and its actors). {st.workers} actor(s) with "
            f"{_ort_layout(st.runners, st.threads)} of ONNX Runtime: decoding {st.decode_s:.1f} s, inference {st.infer_s:.1f} s (summed over actors)"
        )
    elif s.images_computed:
        click.echo(
            f"{s.images_computed} images in {st.run_s:.1f} s ({s.images_per_s:.0f} img/s; {s.seconds:.1f} s in all). "
            f"Decoding {st.decode_s:.1f} s of worker time ({st.workers} worker(s)), inference {st.infer_s:.1f} s "
            f"({_ort_layout(st.runners, st.threads)}), inference waiting for decoded images {st.wait_s:.1f} s, "
            f"writing {st.write_s:.1f} s"
        )


def _ort_layout(runners: int, threads: int) -> str:
    if runners > 1:
        return f"{runners} calls at once, {threads} thread(s) each"
    return f"{threads} thread(s)"

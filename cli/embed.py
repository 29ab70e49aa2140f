"""``backbones embed``: image collections -> Parquet shards of feature vectors."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from embed.config import EmbedConfig

from .common import echo_json, handle_errors


def config_option(field: str, *decls: str, **extra: Any) -> Callable[[Any], Any]:
    """A click option for the :class:`EmbedConfig` field ``field``: its default, its help text and
    a type that checks the field's bounds all come from the field."""
    info = EmbedConfig.model_fields[field]
    kwargs: dict[str, Any] = {"default": info.default, "help": info.description}
    if not extra.get("is_flag") and info.default is not None and not isinstance(info.default, bool):
        kwargs["show_default"] = True
    kind = _click_type(
        info.annotation, {k: getattr(m, k) for m in info.metadata for k in ("ge", "le") if hasattr(m, k)}
    )
    if kind is not None:
        kwargs["type"] = kind
    return click.option(*(decls or ["--" + field.replace("_", "-")]), field, **kwargs, **extra)


def _click_type(annotation: Any, bounds: dict[str, Any]) -> click.ParamType | None:
    """click's type for a field's type (``X | None``: X's) and its ``ge``/``le`` bounds."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice(typing.get_args(annotation))
    if annotation is int:
        return click.IntRange(bounds.get("ge"), bounds.get("le"))
    if annotation is float:
        return click.FloatRange(bounds.get("ge"), bounds.get("le"))
    return None


@click.command("embed")
@click.argument("ref")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="DIR|URL",
    help="Folder (created if missing) or an object-store prefix URL, for part-*.parquet, _manifest.json and "
    "_errors.jsonl.",
)
@config_option("batch_size")
@config_option("workers")
@config_option("threads")
@config_option("engine")
@config_option("top_k", "-k", "--top-k")
@config_option("shard_size")
@config_option("overwrite", is_flag=True)
@config_option("ray_address", metavar="ADDR")
@config_option("ray_actors")
@config_option("ray_gpus")
@config_option("path_column")
@config_option("id_column")
@config_option("progress", "--progress/--no-progress")
@click.option("--json", "as_json", is_flag=True, help="Print only the final summary, as JSON.")
@handle_errors
def embed_cmd(ref: str, inputs: tuple[str, ...], output: str, as_json: bool, **options: Any) -> None:
    """Embed images with model REF into Parquet shards under --output.

    INPUT: image files, folders (searched recursively), globs ('shots/**/*.jpg', quoted) and
    manifests (.csv, .parquet, .jsonl) with a 'path' column and an optional 'id' column;
    relative manifest paths are relative to the manifest. Each may be in an object store
    (s3://bucket/prefix, listed recursively), and manifest paths may be s3:// URLs; credentials
    and endpoints come from the AWS variables and profiles (AWS_ENDPOINT_URL for MinIO).
    Order is deterministic; the id of an image is the manifest's id, else its path.

    Each part-NNNNN.parquet holds id, path, embedding (float32 x the model's feature size) and,
    with --top-k, predictions. Unreadable images go to _errors.jsonl and do not stop the job.
    Running the same command again resumes: finished shards are kept, the rest is computed.
    Read the folder as one dataset: pyarrow.dataset.dataset(DIR), pandas.read_parquet(DIR),
    polars.read_parquet('DIR/*.parquet'), DuckDB 'DIR/*.parquet', spark.read.parquet(DIR).
    """
    from embed import run_embed

    config = EmbedConfig(**options)
    if config.engine != "ray" and (config.ray_address or config.ray_actors or config.ray_gpus):
        raise click.UsageError("--ray-address, --ray-actors and --ray-gpus need --engine ray")
    summary = run_embed(ref, inputs, output, config)
    if as_json:
        echo_json(summary.to_dict())
        return
    s, st = summary, summary.stats
    click.echo(
        f"{s.embedded} of {s.inputs} images embedded with {s.model} (dim {s.dim}) into {s.output}: "
        f"{s.shards} shard(s), {s.shards_computed} computed now, {s.shards_skipped} already done"
    )
    if s.errors:
        where = f"{s.output}/_errors.jsonl" if "://" in s.output else Path(s.output) / "_errors.jsonl"
        click.echo(f"{s.errors} image(s) could not be read: see {where}")
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

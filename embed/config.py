"""What one embedding job is asked to do, as one typed object: the single source of the job's
defaults. ``backbones embed`` maps its options onto :class:`EmbedConfig` (defaults and help
texts come from here), and :func:`embed.run_embed` takes it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.cores import batch_plan

Engine = Literal["local", "ray"]

# Ray actors on CPUs: one per this many CPUs, laid out as the local engine lays out that many cores.
RAY_CPUS_PER_ACTOR = 2
# Ray actors on GPUs: decode threads per actor (decoding feeds the GPU; ONNX Runtime takes one thread).
RAY_GPU_DECODE_THREADS = 4

_RAY_CPU = batch_plan(RAY_CPUS_PER_ACTOR, gpu=False)


class EmbedConfig(BaseModel):
    """One job's options (the model, the inputs and the output folder are the job's arguments).
    The descriptions are the CLI's help texts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Engine = Field(default="local", description="Where the job runs: this process and its workers, or Ray.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per ONNX Runtime call.")
    shard_size: int = Field(default=1000, ge=1, description="Images per Parquet file.")
    workers: int | None = Field(
        default=None,
        ge=0,
        description="Decode processes (0: decode in the main process); with --engine ray, decode threads per "
        "actor. Default: half the cores on a CPU, every core with a GPU (ray: "
        f"{_RAY_CPU.workers} per actor, {RAY_GPU_DECODE_THREADS} with a GPU).",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="ONNX Runtime as one call at a time on this many intra-op threads (ray: per actor). "
        "Default: on a CPU one single-threaded call per core at once (ray: "
        f"{_RAY_CPU.runners} per actor), measured fastest; with a GPU one call.",
    )
    top_k: int | None = Field(default=None, ge=1, description="Also store the K most probable classes per image.")
    overwrite: bool = Field(default=False, description="Delete what an earlier job wrote to --output and start over.")
    path_column: str = Field(default="path", description="Manifest column with the image paths.")
    id_column: str = Field(default="id", description="Manifest column with the ids (optional).")
    progress: bool | None = Field(
        default=None, description="Progress bar on stderr. Default: when stderr is a terminal."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to run on (--engine ray). Default: a local Ray."
    )
    ray_actors: int | None = Field(
        default=None,
        ge=1,
        description="ONNX Runtime actors (--engine ray). Default: one per --ray-gpus GPUs with those, "
        f"else one per {RAY_CPUS_PER_ACTOR} CPUs.",
    )
    ray_gpus: float = Field(default=0, ge=0, description="GPUs per actor (--engine ray).")

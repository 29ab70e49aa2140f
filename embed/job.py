"""A batch embedding job's types: the shard plan, the job (a model version, an ordered list of
inputs and an output folder), what the engines report, and the summary the CLI prints.

The inputs are cut into shards of ``shard_size`` consecutive items; the plan depends only on the
input list and the shard size, so a re-run finds the shards a killed run finished and computes
only the others. Both engines (:mod:`embed.local`, :mod:`embed.ray_engine`) decode with the
version's :class:`models.preprocess.ImageLoader`, run its ONNX graph through
:class:`models.runtime.OnnxSession` and write through :func:`embed.output.shard_table`, so an
image's vector is what :meth:`models.inference.InferenceModel.embed` returns for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models import StoredVersion
from models.registry import sha256_file
from models.spec import SPEC_FILENAME

from . import output as out_
from .config import EmbedConfig
from .decode import LoaderConfig
from .inputs import Item
from .job_output import JobOutput, open_output


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first item (inclusive)
    stop: int  # last item (exclusive)

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` items (the last one may be smaller)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]


def inputs_fingerprint(items: Sequence[Item]) -> str:
    """sha256 of the ordered ``(id, path)`` list: what decides which image lands in which shard."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.path]).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class EngineStats:
    """Time of this run, summed over shards (seconds)."""

    decode_s: float = 0.0  # decode + preprocess time of the workers, summed
    infer_s: float = 0.0  # ONNX Runtime
    wait_s: float = 0.0  # the inference loop waiting for decoded images
    write_s: float = 0.0
    startup_s: float = 0.0  # starting workers and the ONNX Runtime session (or the Ray cluster)
    run_s: float = 0.0  # from the first image to the last shard written
    images: int = 0  # images read in this run (embedded + failed)
    workers: int = 0
    threads: int = 0  # ONNX Runtime intra-op threads per call
    runners: int = 1  # ONNX Runtime calls at once (local engine on a CPU: one per core)


@dataclass
class EmbedSummary:
    """What a job did; the CLI prints it (``--json``: as JSON)."""

    output: str
    model: str
    engine: str
    dim: int
    inputs: int
    embedded: int
    errors: int
    shards: int
    shards_computed: int
    shards_skipped: int
    images_computed: int
    seconds: float  # the whole command: inputs, model, startup, images, writing
    images_per_s: float  # images_computed over stats.run_s (startup excluded)
    stats: EngineStats = field(default_factory=EngineStats)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EmbedJob:
    """A planned job: the model version, the inputs, the shard plan, the output (a local folder
    or an object-store prefix) and the options (``config``) the engines run it with."""

    def __init__(
        self,
        stored: StoredVersion,
        items: Sequence[Item],
        output: JobOutput | Path | str,
        config: EmbedConfig | None = None,
        *,
        loader_config: LoaderConfig | None = None,
    ) -> None:
        self.stored = stored
        self.spec = stored.spec
        self.items = list(items)
        self.output = output if isinstance(output, JobOutput) else open_output(output)
        self.config = config or EmbedConfig()
        self.shards = plan_shards(len(self.items), self.config.shard_size)
        self.spec_sha256 = sha256_file(stored.file(SPEC_FILENAME))
        self.fingerprint = inputs_fingerprint(self.items)
        if loader_config is None:
            from models import ImageLoader, get_settings

            s = get_settings()
            loader_config = LoaderConfig.of(
                ImageLoader(self.spec.preprocess, max_pixels=s.max_image_pixels, draft=s.draft_decoding)
            )
        self.loader_config = loader_config
        self.schema = out_.output_schema(
            self.spec.feature_dim,
            self.config.top_k,
            {"backbones.model": self.spec.tag, "backbones.spec_sha256": self.spec_sha256},
        )

    def identity(self) -> dict[str, Any]:
        """What must match for a run to resume in a folder another run started."""
        return {
            "model": self.spec.tag,
            "spec_sha256": self.spec_sha256,
            "inputs": self.fingerprint,
            "shard_size": self.config.shard_size,
            "top_k": self.config.top_k,
        }

    def table(self, ids: Sequence[str], paths: Sequence[str], features: np.ndarray, logits: np.ndarray | None) -> Any:
        """The Arrow table of one shard's embedded rows."""
        idx = score = None
        if self.config.top_k:
            if logits is None:
                raise ValueError("top_k needs the logits")
            idx, score = out_.top_k_arrays(logits, self.config.top_k)
        return out_.shard_table(self.schema, ids, paths, features, self.spec.labels, idx, score)

    def manifest(self, status: str, records: Sequence[out_.ShardRecord], runs: list[dict[str, Any]]) -> dict[str, Any]:
        embedded = sum(r.rows for r in records)
        errors = sum(len(r.errors) for r in records)
        return {
            "format": out_.FORMAT,
            "status": status,
            "updated_at": datetime.now(UTC).isoformat(),
            "job": self.identity(),
            "model": {
                "tag": self.spec.tag,
                "name": self.spec.name,
                "version": self.spec.version,
                "parent": self.spec.parent,
                "spec_sha256": self.spec_sha256,
                "files": self.spec.files,
                "exporter": self.spec.exporter,
            },
            "preprocessing": self.spec.preprocess.to_dict(),
            "decode": {"max_pixels": self.loader_config.max_pixels, "draft": self.loader_config.draft},
            "dim": self.spec.feature_dim,
            "top_k": self.config.top_k,
            "schema": {f.name: str(f.type) for f in self.schema},
            "plan": {"inputs": len(self.items), "shard_size": self.config.shard_size, "shards": len(self.shards)},
            "counts": {
                "inputs": len(self.items),
                "embedded": embedded,
                "errors": errors,
                "shards_done": len(records),
                "shards_total": len(self.shards),
            },
            "libraries": library_versions(),
            "runs": runs,
        }


def library_versions() -> dict[str, str]:
    """Versions of what decides the vectors and the files (the exporter's are in the spec)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for pkg in ("backbones", "onnxruntime-gpu", "onnxruntime", "numpy", "pillow", "pyarrow", "ray"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    return versions

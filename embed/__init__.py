"""Batch feature extraction: image collections -> Parquet shards of embeddings.

``run_embed`` is the entry (:mod:`embed.run`), :class:`EmbedConfig` what a job is asked to do
and the one place for its defaults (:mod:`embed.config`); the job's types live in
:mod:`embed.job`, below the engines (:mod:`embed.local`, :mod:`embed.ray_engine`) that the
dispatcher chooses between. Inputs (:mod:`embed.inputs`), decoding (:mod:`embed.decode`) and the
output (:mod:`embed.output` for the files, :mod:`embed.job_output` for a local folder or an
object-store prefix) are shared by both engines; :mod:`models.storage` reads objects and turns an
object store's failures into one clear line.
"""

from .config import EmbedConfig, Engine
from .inputs import InputError, Item, ManifestError, collect_inputs
from .job import EmbedJob, EmbedSummary, EngineStats, Shard
from .output import OutputError
from .run import run_embed

__all__ = [
    "EmbedConfig",
    "EmbedJob",
    "EmbedSummary",
    "Engine",
    "EngineStats",
    "InputError",
    "Item",
    "ManifestError",
    "OutputError",
    "Shard",
    "collect_inputs",
    "run_embed",
]

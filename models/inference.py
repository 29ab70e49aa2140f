"""A registered version ready to answer: its checked files, its ONNX session and its eval transform."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IntegrityError
from .imaging import Source
from .preprocess import ImageLoader
from .registry import Registry, StoredVersion
from .runtime import OnnxSession, Outputs
from .settings import Settings, get_settings
from .spec import ONNX_FILENAME, VersionSpec

DEFAULT_TOP_K = 5  # classes a classification returns when the caller does not say


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "score": self.score}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """The ``k`` most probable classes per row of ``logits``, best first."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    probs = softmax(np.atleast_2d(logits))
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [Prediction(int(i), labels[int(i)], float(row[i])) for i in ids] for ids, row in zip(idx, probs, strict=True)
    ]


PREFLIGHT_DIR = "preflight"  # in the registry's own folder: the preflight passes remembered


def read_verified(stored: StoredVersion, name: str = ONNX_FILENAME) -> bytes:
    """The bytes of one of the version's files, checked against the sha256 its spec records: the
    caller uses these bytes, so a file replaced after ``Registry.get`` verified it is caught."""
    data = stored.file(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != stored.spec.files[name]:
        raise IntegrityError(f"{stored.spec.tag}: {name} changed after it was verified; refusing to load it")
    return data


def check_version(stored: StoredVersion, *, settings: Settings, memo_dir: Path | None = None) -> None:
    """The version's graph loaded and run once in the preflight child (models/preflight.py), on the
    providers a session with ``settings`` uses; raises :class:`ArtifactError` if it is refused."""
    from .preflight import expectation, preflight
    from .runtime import provider_names, session_providers

    path = stored.file(ONNX_FILENAME)
    preflight(
        path,
        expectation(stored.spec),
        sha256=stored.spec.files[ONNX_FILENAME],
        settings=settings,
        providers=provider_names(session_providers(settings, path)),
        memo_dir=memo_dir,
    )


def open_version(
    stored: StoredVersion,
    *,
    settings: Settings | None = None,
    threads: int | None = None,
    preflight: bool = True,
    memo_dir: Path | None = None,
    warmup_batch: int = 1,
) -> OnnxSession:
    """An ONNX Runtime session over the version's graph, as every consumer opens one (the service,
    ``classify``, both embed engines, fine-tuning features, INT8/FP16 conversion): the graph is
    first loaded and run in a child process (models/preflight.py) on the providers this session
    will use, then the session is built from bytes whose sha256 is the spec's, the digest the
    child checked. ``memo_dir``: where passes are remembered (the registry's own folder)."""
    settings = settings or get_settings()
    if preflight:
        check_version(stored, settings=settings, memo_dir=memo_dir)
    return OnnxSession(read_verified(stored), settings=settings, threads=threads, warmup_batch=warmup_batch)


class InferenceModel:
    """Classification and embedding with one registered version (one session, two outputs)."""

    def __init__(
        self,
        stored: StoredVersion,
        *,
        settings: Settings | None = None,
        threads: int | None = None,
        preflight: bool = True,
        memo_dir: Path | None = None,
        lone_threads: int = 0,
    ) -> None:
        """The version's graph goes through :func:`open_version` (checked in a child process on
        the providers it will run on, then loaded from the very bytes that were hashed);
        ``preflight=False`` is for graphs this process has just made and checked itself.
        ``lone_threads``: a second session on that many threads for calls that run alone
        (:meth:`run_alone`; models.cores.plan_serving)."""
        settings = settings or get_settings()
        self.stored = stored
        self.spec: VersionSpec = stored.spec
        self.tag = stored.spec.tag
        if preflight:
            check_version(stored, settings=settings, memo_dir=memo_dir)
        graph = read_verified(stored)  # as open_version does; read and hashed once for both sessions
        self.session = OnnxSession(graph, settings=settings, threads=threads)
        self.lone_session = (
            OnnxSession(graph, settings=settings, threads=lone_threads)
            if lone_threads and lone_threads != threads
            else self.session
        )
        self.loader = ImageLoader(
            self.spec.preprocess, max_pixels=settings.max_image_pixels, draft=settings.draft_decoding
        )

    @classmethod
    def load(
        cls,
        ref: str,
        *,
        registry: Registry | None = None,
        settings: Settings | None = None,
        threads: int | None = None,
        preflight: bool = True,
        lone_threads: int = 0,
    ) -> InferenceModel:
        """Load ``ref`` (checksums verified); a catalog name with no version yet is exported first."""
        from .export import ensure_version

        registry = registry or Registry(settings=settings)
        stored = ensure_version(ref, registry)
        return cls(
            stored,
            settings=settings,
            threads=threads,
            preflight=preflight,
            memo_dir=registry.own_dir(PREFLIGHT_DIR),
            lone_threads=lone_threads,
        )

    def run(self, batch: np.ndarray) -> Outputs:
        return self.session.run(batch)

    def run_alone(self, batch: np.ndarray) -> Outputs:
        """As :meth:`run`, for a call nothing else runs beside: on the session with more threads."""
        return self.lone_session.run(batch)

    def classify(self, sources: Sequence[Source], k: int = DEFAULT_TOP_K) -> list[list[Prediction]]:
        return top_k(self.run(self.loader.batch(sources)).logits, self.spec.labels, k)

    def embed(self, sources: Sequence[Source]) -> np.ndarray:
        return self.run(self.loader.batch(sources)).features

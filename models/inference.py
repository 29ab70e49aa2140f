"""A registered version ready to answer: its checked files, its ONNX session and its eval transform."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


class InferenceModel:
    """Classification and embedding with one registered version (one session, two outputs)."""

    def __init__(
        self,
        stored: StoredVersion,
        *,
        settings: Settings | None = None,
        threads: int | None = None,
        preflight: bool = False,
    ) -> None:
        """``preflight``: load and run the file in a child process first (models/preflight.py), so
        that a file that crashes ONNX Runtime never reaches this process; the service does this."""
        settings = settings or get_settings()
        self.stored = stored
        self.spec: VersionSpec = stored.spec
        self.tag = stored.spec.tag
        if preflight:
            from .preflight import expectation
            from .preflight import preflight as check

            check(
                stored.file(ONNX_FILENAME),
                expectation(self.spec),
                sha256=self.spec.files[ONNX_FILENAME],
                settings=settings,
            )
        self.session = OnnxSession(stored.file(ONNX_FILENAME), settings=settings, threads=threads)
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
        preflight: bool = False,
    ) -> InferenceModel:
        """Load ``ref`` (checksums verified); a catalog name with no version yet is exported first."""
        from .export import ensure_version

        stored = ensure_version(ref, registry or Registry(settings=settings))
        return cls(stored, settings=settings, threads=threads, preflight=preflight)

    def run(self, batch: np.ndarray) -> Outputs:
        return self.session.run(batch)

    def classify(self, sources: Sequence[Source], k: int = DEFAULT_TOP_K) -> list[list[Prediction]]:
        return top_k(self.run(self.loader.batch(sources)).logits, self.spec.labels, k)

    def embed(self, sources: Sequence[Source]) -> np.ndarray:
        return self.run(self.loader.batch(sources)).features

"""Features (and logits) of a registered version on a set of images, cached on disk.

The cache lives under the registry home (``<home>/backbones/feature-cache/``), one folder per model
version and decode setting; the key of an image is the sha256 of its content, so a renamed or moved
photo is still a hit and a changed one is a miss. An object in a bucket (``s3://``) is keyed by the
checksum its store lists (the ETag and the size, :mod:`finetune.objects`), never by downloading it
to hash it: a re-run on unchanged objects reads none of them, an overwritten one is computed again. Each run that computes something adds one shard
(a safetensors file: ``features``, ``logits``, and the image hashes in its metadata), written to a
temporary name and renamed, so readers never see half a shard. Images that failed to decode are
remembered too, so a second run on the same photos decodes nothing at all.

The features come from the version's own ONNX session and eval preprocessing
(:class:`models.inference.InferenceModel`): exactly what serving computes. The linear probe may ask
for more views of its training images (:mod:`finetune.views`); each is cached under the image's
sha256 and the view's name, and an image is decoded once for all of its missing views.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import InferenceModel, Registry, Settings, StoredVersion, get_settings
from models.files import replacing
from models.registry import sha256_file
from models.runtime import available_cores
from models.spec import SPEC_FILENAME
from models.storage import StorageError

from .config import config_default
from .data import Sample
from .views import CENTER, probe_views

log = logging.getLogger(__name__)

CACHE_DIRNAME = "feature-cache"


def cache_root(registry: Registry) -> Path:
    return registry.own_dir(CACHE_DIRNAME)


def model_key(stored: StoredVersion, settings: Settings) -> str:
    """The cache folder of a version: its tag, and a hash of its spec file (so a version deleted and
    registered again under the same tag is not mistaken for the old one) and of the decode settings
    that change pixels (draft decoding) or what is refused (the pixel limit)."""
    spec_sha = sha256_file(stored.file(SPEC_FILENAME))
    decode = json.dumps({"draft": settings.draft_decoding, "max_pixels": settings.max_image_pixels}, sort_keys=True)
    digest = hashlib.sha256(f"{spec_sha}\0{decode}".encode()).hexdigest()[:20]
    return f"{stored.spec.name}--{stored.spec.version}--{digest}"


@dataclass
class FeatureStats:
    """What one extraction did: ``computed`` images went through the model, ``cached`` did not."""

    computed: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0
    views: int = 1  # views per image

    def to_dict(self) -> dict[str, float | int]:
        return {
            "computed": self.computed,
            "cached": self.cached,
            "failed": self.failed,
            "seconds": self.seconds,
            "views": self.views,
        }


@dataclass
class FeatureTable:
    """Rows of features and logits by :func:`view_key` (an image's sha256 for its eval view)."""

    features: np.ndarray
    logits: np.ndarray
    index: dict[str, int]
    failed: dict[str, str]  # sha256 -> why it could not be decoded
    stats: FeatureStats = field(default_factory=FeatureStats)

    def rows(self, samples: Sequence[Sample], view: str = CENTER) -> tuple[np.ndarray, np.ndarray]:
        """``(features, logits)`` of ``samples``' ``view``, in their order (all must have been extracted)."""
        idx = [self.index[view_key(s.sha256, view)] for s in samples]
        return self.features[idx], self.logits[idx]


class FeatureCache:
    """The on-disk cache of one model version's outputs (see the module docstring)."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key

    def load(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
        """Everything cached: sha256 -> (features, logits), and sha256 -> failure reason."""
        from safetensors import safe_open

        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        failed: dict[str, str] = {}
        if not self.dir.is_dir():
            return rows, failed
        for shard in sorted(self.dir.glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="numpy") as f:
                    meta = f.metadata() or {}
                    shas = json.loads(meta.get("sha256", "[]"))
                    failed.update(json.loads(meta.get("failed", "{}")))
                    if shas:
                        feats, logits = f.get_tensor("features"), f.get_tensor("logits")
                        for i, sha in enumerate(shas):
                            rows[sha] = (feats[i], logits[i])
            except Exception as e:  # a damaged shard is a cache miss, never a failed run
                log.warning("ignoring unreadable feature-cache shard %s (%s)", shard, e)
        for sha in rows:
            failed.pop(sha, None)
        return rows, failed

    def add(self, shas: Sequence[str], features: np.ndarray, logits: np.ndarray, failed: dict[str, str]) -> None:
        """Write one shard with new rows and failures (atomically: temp file, then rename)."""
        from safetensors.numpy import save_file

        if not shas and not failed:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = (
            {"features": np.ascontiguousarray(features), "logits": np.ascontiguousarray(logits)} if len(shas) else {}
        )
        if not tensors:  # safetensors needs a tensor; a failures-only shard carries an empty one
            tensors = {"features": np.zeros((0, 1), np.float32), "logits": np.zeros((0, 1), np.float32)}
        meta = {"sha256": json.dumps(list(shas)), "failed": json.dumps(failed)}
        with replacing(self.dir / f"{os.getpid()}-{uuid.uuid4().hex}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)


def view_key(sha256: str, view: str) -> str:
    """The cache key of one view of an image: its sha256 for the eval view, ``sha256:view`` else."""
    return sha256 if view == CENTER else f"{sha256}:{view}"


def _batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def extract_features(
    stored: StoredVersion,
    samples: Sequence[Sample],
    *,
    registry: Registry,
    settings: Settings | None = None,
    views: Sequence[str] = (CENTER,),
    batch_size: int = config_default("batch_size"),
    workers: int | None = None,
    progress: bool = False,
) -> FeatureTable:
    """Features and logits of ``samples`` under ``stored``, for each of ``views``
    (:mod:`finetune.views`; the eval view alone unless asked); images that fail to decode are
    listed in ``failed``, not raised. With the cache warm the model is not even loaded."""
    settings = settings or get_settings()
    start = time.perf_counter()
    cache = FeatureCache(cache_root(registry), model_key(stored, settings))
    cached, known_bad = cache.load()
    unique: dict[str, Sample] = {}
    for s in samples:
        unique.setdefault(s.sha256, s)
    # per image, the views that are not cached yet
    todo = {
        sha: missing
        for sha in unique
        if sha not in known_bad and (missing := [v for v in views if view_key(sha, v) not in cached])
    }
    stats = FeatureStats(cached=len(unique) - len(todo), views=len(views))
    fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    new_failed: dict[str, str] = {}
    if todo:
        log.info("computing features of %d image(s) with %s (%d cached)", len(todo), stored.tag, stats.cached)
        fresh, new_failed = _compute(
            stored, [unique[sha] for sha in todo], todo, settings, batch_size, workers, progress
        )
        stats.computed = len({key.split(":")[0] for key in fresh})
        cache.add(
            list(fresh),
            np.stack([f for f, _ in fresh.values()]) if fresh else np.zeros((0, 1), np.float32),
            np.stack([g for _, g in fresh.values()]) if fresh else np.zeros((0, 1), np.float32),
            new_failed,
        )
    else:
        log.info("all %d image(s) have cached features for %s: no feature work", len(unique), stored.tag)
    failed = {sha: why for sha, why in {**known_bad, **new_failed}.items() if sha in unique}
    stats.failed = len(failed)
    index: dict[str, int] = {}
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for sha in unique:
        for view in views:
            key = view_key(sha, view)
            row = fresh.get(key) or cached.get(key)
            if row is None:
                continue
            index[key] = len(feats)
            feats.append(row[0])
            logits.append(row[1])
    stats.seconds = time.perf_counter() - start
    dim, classes = stored.spec.feature_dim, stored.spec.num_classes
    return FeatureTable(
        features=np.stack(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32),
        logits=np.stack(logits).astype(np.float32) if logits else np.zeros((0, classes), np.float32),
        index=index,
        failed=failed,
        stats=stats,
    )


def _compute(
    stored: StoredVersion,
    todo: Sequence[Sample],
    missing: dict[str, list[str]],
    settings: Settings,
    batch_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Run the model on the ``missing`` views of ``todo``: ``(cache key -> (features, logits),
    sha256 -> why an image could not be decoded)``. Each image is decoded once, whatever its views."""
    from tqdm import tqdm

    model = InferenceModel(stored, settings=settings)
    make_views = {names: probe_views(stored.spec.preprocess, names) for names in {tuple(v) for v in missing.values()}}
    threads = max(1, workers if workers is not None else min(4, available_cores()))

    def decode(s: Sample) -> list[np.ndarray] | str:
        try:
            return make_views[tuple(missing[s.sha256])](model.loader.decode(s.source()))
        except StorageError:
            raise  # the store, not the image: nothing is remembered as bad
        except Exception as e:  # ImageError, or a file or object that vanished since the scan
            return str(e) or type(e).__name__

    fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    failed: dict[str, str] = {}
    batches = list(_batches(todo, batch_size))
    with (
        ThreadPoolExecutor(threads) as pool,
        tqdm(total=len(todo), desc="features", unit="img", disable=not progress, leave=False) as bar,
    ):
        # pool.map submits at once: the next batch decodes while ONNX Runtime runs this one
        ahead = pool.map(decode, batches[0])
        for i, batch in enumerate(batches):
            results = ahead
            if i + 1 < len(batches):
                ahead = pool.map(decode, batches[i + 1])
            arrays: list[np.ndarray] = []
            keys: list[str] = []
            for s, r in zip(batch, results, strict=True):
                if isinstance(r, str):
                    failed[s.sha256] = r
                    log.debug("cannot decode %s: %s", s.rel, r)
                    continue
                arrays.extend(r)
                keys.extend(view_key(s.sha256, v) for v in missing[s.sha256])
            for at in range(0, len(arrays), batch_size):
                out = model.run(np.stack(arrays[at : at + batch_size]))
                fresh.update(zip(keys[at : at + batch_size], zip(out.features, out.logits, strict=True), strict=True))
            bar.update(len(batch))
    return fresh, failed

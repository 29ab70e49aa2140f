"""What every derived precision shares: the comparison with the FP32 parent, the accuracy gate,
and registration as a new version whose ``parent`` is the version it was converted from.

A converted version keeps its parent's preprocessing, labels, feature size and architecture, and
a copy of its PyTorch weights (``weights.safetensors``, the FP32 weights the graph was made from),
so that serving, ``classify``, ``embed`` and fine-tuning take it like any other version. Its spec
says ``precision`` ("int8" / "fp16") and holds a ``conversion`` record (see :func:`register_converted`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError
from .registry import Registry, StoredVersion
from .runtime import CPU, OnnxSession
from .settings import Settings
from .spec import ONNX_FILENAME, WEIGHTS_FILENAME, Precision

log = logging.getLogger(__name__)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-12)  # type: ignore[no-any-return]


def verified_parent(parent: StoredVersion, folder: Path, *, settings: Settings | None = None) -> Path:
    """A copy of the parent's graph in ``folder`` for a conversion to read: checked in the
    preflight child on the CPU (where conversions run) and written from the bytes whose sha256
    the spec records, so the graph converted and compared is the graph that was verified."""
    from .inference import read_verified
    from .preflight import expectation, preflight

    settings = settings or Settings(providers="cpu")
    preflight(
        parent.file(ONNX_FILENAME), expectation(parent.spec), sha256=parent.spec.files[ONNX_FILENAME], settings=settings
    )
    copy = folder / f"parent-{ONNX_FILENAME}"
    copy.write_bytes(read_verified(parent))
    return copy


def compare_with_parent(
    parent_onnx: Path, child_onnx: Path, batches: Iterable[np.ndarray], *, settings: Settings | None = None
) -> dict[str, Any]:
    """Run the parent and the converted graph on the same preprocessed ``batches``.

    On the CPU unless ``settings`` say otherwise: the gate must give the same answer on every
    machine. Returns images, top-1 agreement (fraction and count), max |logit error|, max
    |feature error| and the cosine of the feature vectors (min and mean).
    """
    settings = settings or Settings(providers="cpu")
    parent = OnnxSession(parent_onnx, settings=settings, warmup_batch=0)
    child = OnnxSession(child_onnx, settings=settings, warmup_batch=0)
    agree, logit_err, feature_err, cosines = [], 0.0, 0.0, []
    for batch in batches:
        p, c = parent.run(batch), child.run(batch)
        agree.append(p.logits.argmax(1) == c.logits.argmax(1))
        logit_err = max(logit_err, float(np.abs(p.logits - c.logits).max()))
        feature_err = max(feature_err, float(np.abs(p.features - c.features).max()))
        cosines.append(_cosines(p.features, c.features))
    if not agree:
        raise ConversionError("no images to compare the converted graph with its parent on")
    hits, cos = np.concatenate(agree), np.concatenate(cosines)
    return {
        "images": int(hits.size),
        "top1_agreement": float(hits.mean()),
        "top1_agreeing": int(hits.sum()),
        "max_abs_logit_diff": logit_err,
        "max_abs_feature_diff": feature_err,
        "feature_cosine_min": float(cos.min()),
        "feature_cosine_mean": float(cos.mean()),
        "provider": child.providers[0] if child.providers else CPU,
    }


# The top-1 agreement with the parent a converted version must reach unless told otherwise: the
# setting's default (BACKBONES_QUANTIZE_MIN_AGREEMENT), written once.
DEFAULT_MIN_AGREEMENT: float = Settings.model_fields["quantize_min_agreement"].default


def images_to_allow_one_miss(min_agreement: float) -> int:
    """How many compared images a threshold needs before a single disagreement can pass it."""
    return math.ceil(1 / max(1 - min_agreement, 1e-9))


def check_agreement(report: Mapping[str, Any], min_agreement: float, *, what: str, advice: str) -> None:
    """Raise :class:`ConversionError` when top-1 agreement with the parent is below ``min_agreement``.

    The message says how coarse the measurement was: with n compared images one disagreement
    costs 1/n, so a small set cannot show a 98 % agreement unless it is perfect."""
    agreement, n, hits = report["top1_agreement"], report["images"], report["top1_agreeing"]
    if agreement >= min_agreement:
        return
    msg = (
        f"{what} agrees with its FP32 parent on top-1 for {hits} of {n} held-out images "
        f"({agreement:.1%}), below the required {min_agreement:.1%} (max logit error "
        f"{report['max_abs_logit_diff']:.3g}); nothing was registered."
    )
    needed = images_to_allow_one_miss(min_agreement)
    if n - hits == 1 and n < needed:
        msg += (
            f" With {n} images a single disagreement already costs {100 / n:.1f} points: "
            f"a threshold of {min_agreement:.0%} needs at least {needed} images to allow one, "
            f"so add photos or lower --min-agreement (e.g. {math.floor(100 * agreement) / 100:.2f})."
        )
    else:
        msg += f" {advice}"
    raise ConversionError(msg)


def register_converted(
    registry: Registry,
    parent: StoredVersion,
    name: str,
    onnx_path: Path,
    *,
    precision: Precision,
    conversion: Mapping[str, Any],
    report: Mapping[str, Any],
) -> StoredVersion:
    """Register ``onnx_path`` as a new version of ``name`` derived from ``parent``.

    ``conversion`` is recorded with the parent's tag and precision added; ``report`` is the
    comparison with the parent (the keys ``models show`` prints: images, max_abs_logit_diff,
    top1_agreement), stored as the version's verification against the parent."""
    import onnx

    from .export import library_versions

    graph = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if not o.domain), 0)

    files = {ONNX_FILENAME: onnx_path}
    if WEIGHTS_FILENAME in parent.spec.files:  # a later fine-tune starts from the FP32 weights
        files[WEIGHTS_FILENAME] = parent.file(WEIGHTS_FILENAME)
    p = parent.spec
    record = {"parent": p.tag, "parent_precision": p.precision, "precision": precision, **conversion}
    return registry.register(
        name,
        files,
        {
            "parent": p.tag,
            "architecture": p.architecture,
            "labels": list(p.labels),
            "preprocess": p.preprocess,
            "feature_dim": p.feature_dim,
            "opset": opset,
            "exporter": library_versions(),
            "verification": {**report, "against": p.tag},
            "source": {**p.source, "converted_from": p.tag},
            "training": None,
            "precision": precision,
            "conversion": record,
        },
    )

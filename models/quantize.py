"""INT8 for CPUs: ONNX Runtime static quantization (QDQ, per-channel weights), calibrated on the
user's photos through the model's own preprocessing, and gated on its agreement with the FP32
parent on a held-out part of those photos.

The photos are split once with a seeded permutation: the calibration part sets the activation
ranges, the held-out part (never seen by the calibrator) measures top-1 agreement and logit error
against the parent. Below ``min_agreement`` nothing is registered.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from .convert import (
    DEFAULT_MIN_AGREEMENT,
    check_agreement,
    compare_with_parent,
    images_to_allow_one_miss,
    register_converted,
    verified_parent,
)
from .errors import ConversionError, ImageError
from .export import check_graph
from .graph_prep import fold_static_shapes
from .preprocess import ImageLoader
from .registry import Registry, StoredVersion, validate_name
from .settings import get_settings
from .spec import ONNX_FILENAME

log = logging.getLogger(__name__)

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[CalibrationMethodName, ...] = ("minmax", "entropy", "percentile")
MIN_PHOTOS = 10  # fewer cannot both calibrate and measure anything


@dataclass(frozen=True)
class QuantizeOptions:
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    method: CalibrationMethodName = "minmax"
    holdout_fraction: float = 0.2
    seed: int = 0
    # The first convolutions see the raw normalized pixels and have few channels: keeping them in
    # float costs little time and protects what every later layer builds on.
    float_first_convs: int = 0
    max_calibration_images: int = 500  # ranges settle long before; bounds time and memory
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.min_agreement <= 1:
            raise ConversionError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if self.method not in CALIBRATION_METHODS:
            raise ConversionError(
                f"unknown calibration method {self.method!r}; known: {', '.join(CALIBRATION_METHODS)}"
            )
        if not 0 < self.holdout_fraction < 1:
            raise ConversionError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.float_first_convs < 0 or self.max_calibration_images < 1 or self.batch_size < 1:
            raise ConversionError("float_first_convs must be >= 0, max_calibration_images and batch_size >= 1")


@dataclass(frozen=True)
class PhotoSet:
    """The readable calibration photos (by content hash), split into calibration and held-out parts."""

    calibration: list[Path]
    holdout: list[Path]
    fingerprint: str  # sha256 over the sorted content hashes of every readable photo
    readable: int
    skipped: dict[str, str]  # path -> why it could not be used


def split_photos(
    paths: Sequence[Path], loader: ImageLoader, *, holdout_fraction: float, seed: int, max_calibration: int
) -> PhotoSet:
    """Check that each photo decodes, fingerprint the set, and split it (seeded)."""
    good: list[tuple[str, Path]] = []
    skipped: dict[str, str] = {}
    for path in paths:
        try:
            data = Path(path).read_bytes()
            loader.decode(data)
        except (OSError, ImageError) as e:
            skipped[str(path)] = str(e)
            continue
        good.append((hashlib.sha256(data).hexdigest(), Path(path)))
    for where, why in skipped.items():
        log.warning("skipping calibration photo %s: %s", where, why)
    if len(good) < MIN_PHOTOS:
        raise ConversionError(
            f"INT8 calibration needs at least {MIN_PHOTOS} readable photos, got {len(good)} "
            f"({len(skipped)} unreadable); give a folder of a few hundred photos like those the model will see"
        )
    good.sort()  # the split depends on the photos' content, not on their names or listing order
    fingerprint = hashlib.sha256("\n".join(h for h, _ in good).encode()).hexdigest()
    order = np.random.default_rng(seed).permutation(len(good))
    n_holdout = max(1, round(holdout_fraction * len(good)))
    holdout = [good[i][1] for i in order[:n_holdout]]
    calibration = [good[i][1] for i in order[n_holdout:]][:max_calibration]
    return PhotoSet(calibration, holdout, fingerprint, len(good), skipped)


def batches(paths: Sequence[Path], loader: ImageLoader, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(paths), batch_size):
        yield loader.batch(paths[start : start + batch_size])


def _reader(paths: Sequence[Path], loader: ImageLoader, batch_size: int, input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the calibration photos, preprocessed as the model expects, a batch at a time."""

        def __init__(self) -> None:
            self._it = batches(paths, loader, batch_size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    return Reader()


def prepare_graph(src: Path, dst: Path) -> onnx.ModelProto:
    """The parent's graph with its static shape arithmetic folded and every node named."""
    model = fold_static_shapes(onnx.load(str(src)))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(dst))
    return model


def quantize_graph(
    src: Path, dst: Path, photos: Sequence[Path], loader: ImageLoader, opts: QuantizeOptions
) -> dict[str, Any]:
    """Write the INT8 (QDQ) graph of ``src`` to ``dst``; returns what was done, for the record."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[opts.method]
    quiet = _DropPreprocessAdvice()
    with tempfile.TemporaryDirectory(prefix="backbones-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        model = prepare_graph(src, prepared)
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        excluded = convs[: opts.float_first_convs]
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(
                str(prepared),
                str(dst),
                _reader(photos, loader, opts.batch_size, model.graph.input[0].name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # U8 activations with S8 weights: the combination ONNX Runtime's CPU kernels are made for
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # weights in 7 bits: CPUs without VNNI (AVX2, AVX-512 before it) add u8 x s8 products in
                # pairs into saturating 16-bit sums, which full-range weights can overflow; the graph
                # must agree with its parent on whichever CPU serves it, not only on this one
                reduce_range=True,
                calibrate_method=method,
                nodes_to_exclude=excluded,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        finally:
            logging.getLogger().removeFilter(quiet)
    return {
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
        "weight_bits": 7,
        "convs": len(convs),
        "float_convs": excluded,
    }


class _DropPreprocessAdvice(logging.Filter):
    """ONNX Runtime's quantizer advises, on the root logger, to run its pre-processing first;
    :func:`prepare_graph` has done what matters here, so on a CLI the advice is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_version(
    parent: StoredVersion,
    photos: Sequence[Path],
    *,
    registry: Registry,
    name: str,
    options: QuantizeOptions | None = None,
) -> StoredVersion:
    """Quantize ``parent`` (an FP32 version: exported or fine-tuned) to INT8, calibrated on
    ``photos``; register it as a new version of ``name`` if it passes the agreement gate."""
    opts = options or QuantizeOptions()
    if parent.spec.precision != "fp32":
        raise ConversionError(
            f"{parent.tag} is already {parent.spec.precision}; quantize its FP32 parent ({parent.spec.parent}) instead"
        )
    validate_name(name)  # a typo fails before the slow part
    settings = get_settings()
    loader = ImageLoader(parent.spec.preprocess, max_pixels=settings.max_image_pixels)
    split = split_photos(
        photos,
        loader,
        holdout_fraction=opts.holdout_fraction,
        seed=opts.seed,
        max_calibration=opts.max_calibration_images,
    )
    needed = images_to_allow_one_miss(opts.min_agreement)
    if len(split.holdout) < needed:
        log.warning(
            "only %d held-out photos: one disagreement with the parent costs %.2f points, more than the %.2f "
            "allowed by min_agreement %.2f",
            len(split.holdout),
            100 / len(split.holdout),
            100 * (1 - opts.min_agreement),
            opts.min_agreement,
        )
    log.info("calibrating on %d photos, %d held out (%s)", len(split.calibration), len(split.holdout), opts.method)
    with tempfile.TemporaryDirectory(prefix="backbones-int8-") as tmp:
        out = Path(tmp) / ONNX_FILENAME
        source = verified_parent(parent, Path(tmp))
        details = quantize_graph(source, out, split.calibration, loader, opts)
        check_graph(out)
        report = compare_with_parent(source, out, batches(split.holdout, loader, opts.batch_size))
        check_agreement(
            report,
            opts.min_agreement,
            what=f"the INT8 version of {parent.tag}",
            advice="Try more calibration photos, --calibration-method entropy or percentile, "
            "--float-first-convs N (keep the first N convolutions in float), or lower --min-agreement.",
        )
        conversion = {
            "method": f"onnxruntime static quantization ({opts.method} calibration)",
            **details,
            "options": asdict(opts),
            "calibration": {
                "fingerprint": split.fingerprint,
                "readable": split.readable,
                "skipped": len(split.skipped),
                "calibration_images": len(split.calibration),
                "holdout_images": len(split.holdout),
                "seed": opts.seed,
            },
            "heldout": report,
            "min_agreement": opts.min_agreement,
        }
        return register_converted(registry, parent, name, out, precision="int8", conversion=conversion, report=report)

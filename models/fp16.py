"""FP16 for GPUs: the FP32 graph with its weights and arithmetic in float16 and its input and
outputs kept float32 (ONNX Runtime's own converter, ``keep_io_types=True``), so callers send and
receive exactly what they do with the FP32 version.

The conversion is compared with the parent before it is registered, on the CPU (ONNX Runtime runs
float16 graphs there too, slowly): top-1 agreement, max logit error and the cosine of the feature
vectors. On a GPU, ``tests/test_gpu.py`` checks the same on CUDA and TensorRT.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from .convert import DEFAULT_MIN_AGREEMENT, check_agreement, compare_with_parent, register_converted, verified_parent
from .errors import ConversionError
from .export import check_graph, verification_batch
from .graph_prep import fold_static_shapes, sort_topologically
from .imaging import Source
from .registry import Registry, StoredVersion, validate_name
from .spec import ONNX_FILENAME

log = logging.getLogger(__name__)

# The features of an FP16 graph point the same way as the FP32 ones: float16 keeps ~3 decimal
# digits, which moves a 1280-d feature vector's direction by far less than this.
MIN_FEATURE_COSINE = 0.999


def to_fp16(src: Path, dst: Path) -> onnx.ModelProto:
    """Write the float16 version of the graph at ``src`` to ``dst`` (inputs/outputs stay float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = sort_topologically(convert_float_to_float16(fold_static_shapes(onnx.load(str(src))), keep_io_types=True))
    onnx.save(model, str(dst))
    return model


def convert_version_fp16(
    parent: StoredVersion,
    *,
    registry: Registry,
    name: str,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    verify_sources: Sequence[Source] | None = None,
) -> StoredVersion:
    """Convert ``parent`` (FP32) to FP16, compare it with the parent on ``verify_sources``
    (synthetic photos if none) and register it as a new version of ``name``."""
    if parent.spec.precision != "fp32":
        raise ConversionError(
            f"{parent.tag} is {parent.spec.precision}; convert its FP32 parent ({parent.spec.parent})"
        )
    validate_name(name)
    batch = verification_batch(parent.spec.preprocess, verify_sources, limit=64)
    with tempfile.TemporaryDirectory(prefix="backbones-fp16-") as tmp:
        out = Path(tmp) / ONNX_FILENAME
        source = verified_parent(parent, Path(tmp))
        model = to_fp16(source, out)
        check_graph(out)
        chunks = [batch[i : i + 16] for i in range(0, len(batch), 16)]
        report = compare_with_parent(source, out, chunks)
        check_agreement(
            report,
            min_agreement,
            what=f"the FP16 version of {parent.tag}",
            advice="Compare on more photos (--calibration DIR) or lower --min-agreement.",
        )
        if report["feature_cosine_min"] < MIN_FEATURE_COSINE:
            raise ConversionError(
                f"the FP16 features of {parent.tag} differ from FP32 (cosine {report['feature_cosine_min']:.5f} "
                f"< {MIN_FEATURE_COSINE}): a layer overflows float16; nothing was registered"
            )
        float16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        conversion = {
            "method": "onnxruntime float16 conversion, float32 inputs and outputs",
            "float16_initializers": int(float16),
            "compared_on": "given photos" if verify_sources else "synthetic photos",
            "heldout": report,
            "min_agreement": min_agreement,
            "min_feature_cosine": MIN_FEATURE_COSINE,
        }
        log.info("fp16 %s: %s", parent.tag, {k: report[k] for k in ("top1_agreement", "feature_cosine_min")})
        return register_converted(registry, parent, name, out, precision="fp16", conversion=conversion, report=report)


def float_io(model: onnx.ModelProto) -> bool:
    """Whether every graph input and output is float32 (what the project's callers send and read)."""
    return all(
        v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in (*model.graph.input, *model.graph.output)
    )

"""The linear probe's new version without a new export: the parent's graph with the head replaced.

A probe changes nothing but the head, and the parent's ``model.onnx`` was verified against PyTorch
when it was registered. Its head is one ``Gemm`` from the ``features`` output to ``logits`` whose
weight and bias are initializers (as :func:`models.export.export_onnx` writes every catalog
network), so the new graph is the parent's with those two tensors swapped and the ``logits``
shape changed; ``weights.safetensors`` is the parent's with ``head.weight`` and ``head.bias``
swapped. This skips rebuilding the network in PyTorch, tracing it and checking PyTorch against ONNX
Runtime again: the probe's path imports no PyTorch at all.

The new graph is still checked before it is registered: ``onnx.checker``, the preflight child, and
ONNX Runtime on validation images, whose features must be the parent's (the same body) and whose
logits must be the head applied to them. A parent whose graph does not have that shape (INT8 or
FP16 versions, whose head is quantized or in half precision) goes the PyTorch way instead
(:func:`graft_refusal` says why).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import Registry, Settings, StoredVersion
from models.export import LOGIT_TOLERANCE, check_graph, library_versions
from models.preflight import Expectation, preflight
from models.preprocess import ImageLoader
from models.registry import sha256_file
from models.runtime import OnnxSession
from models.spec import ONNX_FILENAME, WEIGHTS_FILENAME, Architecture

from .data import Sample
from .errors import TrainingError
from .features import FeatureTable
from .linear import LinearHead

log = logging.getLogger(__name__)

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"
METHOD = "the parent's verified graph with a new head; ONNX Runtime features vs the parent's, logits vs the head"


def _head_node(model: Any) -> Any:
    """The ``Gemm`` node that makes ``logits`` from ``features``, or ``None``."""
    from onnx import helper

    for node in model.graph.node:
        if "logits" in node.output:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
            ok = node.op_type == "Gemm" and list(node.input[:1]) == ["features"] and plain and attrs.get("transB") == 1
            return node if ok and len(node.input) == 3 else None
    return None


def graft_refusal(parent: StoredVersion) -> str | None:
    """Why the parent's graph cannot take a new head directly (``None``: it can)."""
    import onnx

    if parent.spec.precision != "fp32":
        return f"{parent.tag} is {parent.spec.precision}"
    if WEIGHTS_FILENAME not in parent.spec.files:
        return f"{parent.tag} has no {WEIGHTS_FILENAME}"
    model = onnx.load(str(parent.file(ONNX_FILENAME)), load_external_data=False)
    node = _head_node(model)
    if node is None:
        return "its logits are not one Gemm on its features"
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    classes, dim = parent.spec.num_classes, parent.spec.feature_dim
    if inits.get(node.input[1]) != (classes, dim) or inits.get(node.input[2]) != (classes,):
        return "its head's weights are not initializers of the spec's shape"
    return None


def _write_graph(parent: StoredVersion, head: LinearHead, path: Path) -> int:
    """Write the new graph to ``path``; returns its opset (the parent's)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(parent.file(ONNX_FILENAME)))
    node = _head_node(model)
    new = {node.input[1]: head.weight.astype(np.float32), node.input[2]: head.bias.astype(np.float32)}
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in new:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new[tensor.name], tensor.name))
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_value = len(head.bias)
    onnx.save(model, str(path))
    return int(next(o.version for o in model.opset_import if not o.domain))


def _write_weights(parent: StoredVersion, head: LinearHead, path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    state = load_file(str(parent.file(WEIGHTS_FILENAME)))
    if state.get(HEAD_WEIGHT) is None or state[HEAD_WEIGHT].shape != (parent.spec.num_classes, head.weight.shape[1]):
        raise TrainingError(f"{parent.tag}'s {WEIGHTS_FILENAME} has no head of its spec's shape; export it again")
    state[HEAD_WEIGHT], state[HEAD_BIAS] = head.weight.astype(np.float32), head.bias.astype(np.float32)
    save_file(state, str(path))


def _verify(
    path: Path, head: LinearHead, samples: Sequence[Sample], table: FeatureTable, loader: ImageLoader
) -> dict[str, Any]:
    """ONNX Runtime on ``samples`` (the parent's features of them are in ``table``)."""
    check_graph(path)
    expect = Expectation(crop=loader.preprocess.crop, num_classes=len(head.bias), feature_dim=head.weight.shape[1])
    preflight(path, expect, sha256=sha256_file(path))
    session = OnnxSession(path, settings=Settings(providers="cpu"), warmup_batch=0)
    out = session.run(loader.batch([s.source() for s in samples]))
    single = session.run(loader.batch([samples[0].source()]))
    expected = head.logits(out.features)
    report: dict[str, Any] = {
        "images": len(samples),
        "max_abs_logit_diff": float(np.abs(out.logits - expected).max()),
        "max_abs_logit_diff_batch1": float(np.abs(single.logits - expected[:1]).max()),
        "max_abs_feature_diff": float(np.abs(out.features - table.rows(samples)[0]).max()),
        "top1_agreement": float((out.logits.argmax(1) == expected.argmax(1)).mean()),
        "tolerance": LOGIT_TOLERANCE,
        "method": METHOD,
    }
    worst = max(report["max_abs_logit_diff"], report["max_abs_logit_diff_batch1"], report["max_abs_feature_diff"])
    if worst > LOGIT_TOLERANCE:
        raise TrainingError(
            f"the new graph does not compute the probe ({worst:.2e} > {LOGIT_TOLERANCE:.0e}); nothing was registered"
        )
    return report


def register_grafted(
    parent: StoredVersion,
    head: LinearHead,
    *,
    registry: Registry,
    name: str,
    labels: list[str],
    training: dict[str, Any],
    verify_samples: Sequence[Sample],
    table: FeatureTable,
    loader: ImageLoader,
    extra_files: dict[str, Path],
) -> StoredVersion:
    """Register the parent's graph and weights with ``head`` as a new version of ``name``
    (``verify_samples``: readable images whose parent features ``table`` holds)."""
    with tempfile.TemporaryDirectory(prefix="backbones-graft-") as tmp:
        onnx_path, weights_path = Path(tmp) / ONNX_FILENAME, Path(tmp) / WEIGHTS_FILENAME
        opset = _write_graph(parent, head, onnx_path)
        _write_weights(parent, head, weights_path)
        report = _verify(onnx_path, head, verify_samples, table, loader)
        arch = parent.spec.architecture
        return registry.register(
            name,
            {ONNX_FILENAME: onnx_path, WEIGHTS_FILENAME: weights_path, **extra_files},
            {
                "parent": parent.tag,
                "architecture": Architecture(family=arch.family, name=arch.name, num_classes=len(labels)),
                "labels": labels,
                "preprocess": parent.spec.preprocess,
                "feature_dim": parent.spec.feature_dim,
                "opset": opset,
                "exporter": library_versions(),
                "verification": report,
                "source": {"finetune": "linear", "backbone": parent.tag, "graph": "parent's, new head"},
                "training": training,
            },
        )

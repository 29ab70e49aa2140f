"""Fold the shape arithmetic of an exported graph into constants.

timm's ``tf_efficientnet_lite0`` pads its convolutions TensorFlow-style ("same"), and the exporter
writes that padding as a small subgraph per convolution: ``Shape`` -> ``Gather`` -> ``Cast`` ->
``Div`` -> ``Ceil`` ... -> ``Pad``. The graph's spatial size is fixed (N, 3, crop, crop; only the
batch axis is dynamic), so every one of those values is a constant. Folding them lets ONNX Runtime
fuse the ``Pad`` into the convolution and lets the INT8 quantizer see plain ``Conv`` chains.

The pass is exact: it only replaces a value by the constant it always has, computed with ONNX's
reference evaluator. ``Shape`` is folded only where the dimensions it reads are static, so the
batch axis stays dynamic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

# Ops whose value is not a function of their inputs alone: never folded.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})
# Do not fold a node whose folded output would be huge (a broadcast of a weight, say): the file grows.
_MAX_FOLDED_ELEMENTS = 1 << 16


def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _shape_slice(node: onnx.NodeProto, rank: int) -> slice:
    attrs = {a.name: a.i for a in node.attribute}
    return slice(attrs.get("start", 0), attrs.get("end", rank))


def _evaluate(
    node: onnx.NodeProto, inputs: list[np.ndarray], opset: Iterable[onnx.OperatorSetIdProto]
) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(inputs))]
    renamed = onnx.helper.make_node(
        node.op_type,
        [names[i] if name else "" for i, name in enumerate(node.input)],
        [f"out{i}" for i in range(len(node.output))],
        domain=node.domain,
    )
    renamed.attribute.extend(node.attribute)
    feeds = {n: a for n, a, orig in zip(names, inputs, node.input, strict=True) if orig}
    evaluator = ReferenceEvaluator(renamed, opsets={o.domain: o.version for o in opset})  # type: ignore[arg-type]
    return [np.asarray(v) for v in evaluator.run(None, feeds)]


def _fold_round(model: onnx.ModelProto) -> int:
    """One pass in graph order; returns the number of nodes replaced by constants."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shape_of: dict[str, list[int | None]] = {}  # outputs of Shape nodes -> the dims they hold
    folded: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain:
            out = _evaluate(node, [], model.opset_import)[0]
            consts[node.output[0]] = out
            continue
        value: list[np.ndarray] | None = None
        if (
            node.op_type == "Shape"
            and node.input[0] in infos
            and infos[node.input[0]].type.tensor_type.HasField("shape")  # rank unknown: nothing to fold
        ):
            dims = _static_dims(infos[node.input[0]])
            selected = dims[_shape_slice(node, len(dims))]
            shape_of[node.output[0]] = selected
            if selected and all(d is not None for d in selected):
                value = [np.asarray(selected, dtype=np.int64)]
        elif node.op_type == "Gather" and node.input[0] in shape_of and node.input[1] in consts:
            dims = shape_of[node.input[0]]
            idx = consts[node.input[1]]
            indices = [int(i) for i in np.ravel(idx)]
            picked = [dims[i] if -len(dims) <= i < len(dims) else None for i in indices]
            if all(d is not None for d in picked):
                value = [np.asarray(picked, dtype=np.int64).reshape(idx.shape)]
        elif (
            node.op_type not in _NONDETERMINISTIC
            and not node.domain
            and node.input
            and all((not i) or i in consts for i in node.input)
        ):
            value = _evaluate(node, [consts[i] if i else np.empty(0) for i in node.input], model.opset_import)
            if any(v.size > _MAX_FOLDED_ELEMENTS for v in value):
                value = None
        if value is None:
            continue
        for name, array in zip(node.output, value, strict=True):
            consts[name] = array
            new_inits.append(numpy_helper.from_array(array, name))
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.node.remove(node)
    graph.initializer.extend(new_inits)
    _prune(model)
    return len(folded)


def _prune(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers that no graph output depends on any more."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def fold_static_shapes(model: onnx.ModelProto, *, max_rounds: int = 64) -> onnx.ModelProto:
    """``model`` with every value that is constant for its declared input shape folded, and each
    zero ``Pad`` that now has constant pads merged into the ``Conv`` it feeds (in place; also
    returned). Rounds repeat because a folded ``Pad`` lets shape inference reach the next layer's
    ``Shape``."""
    before = len(model.graph.node)
    for _ in range(max_rounds):
        if not _fold_round(model):
            break
    _constants_to_initializers(model)
    fused = fuse_pads_into_convs(model)
    log.debug("folded static shapes: %d -> %d nodes (%d pads fused)", before, len(model.graph.node), fused)
    return model


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    constants = [n for n in graph.node if n.op_type == "Constant" and not n.domain]
    for node in constants:
        graph.initializer.append(numpy_helper.from_array(_evaluate(node, [], model.opset_import)[0], node.output[0]))
        graph.node.remove(node)


def fuse_pads_into_convs(model: onnx.ModelProto) -> int:
    """Merge every zero, constant-mode ``Pad`` of the spatial axes whose only reader is a ``Conv``
    into that convolution's own (possibly asymmetric) ``pads``. ONNX Runtime does this itself for
    float graphs; the INT8 quantizer does not, and would leave each such Pad in float between a
    dequantize and a quantize. Returns the number of pads fused."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    fused = 0
    for pad in [n for n in graph.node if n.op_type == "Pad" and not n.domain]:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        users = readers.get(pad.output[0], [])
        if mode != "constant" or len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in outputs:
            continue
        if users[0].input[0] != pad.output[0]:
            continue  # the padded tensor is the convolution's weight or bias, not its data
        if len(pad.input) < 2 or pad.input[1] not in inits or (len(pad.input) > 3 and pad.input[3]):
            continue
        if (
            len(pad.input) > 2
            and pad.input[2]
            and (pad.input[2] not in inits or numpy_helper.to_array(inits[pad.input[2]]).any())
        ):
            continue  # a non-zero fill value is not a convolution's padding
        pads = [int(v) for v in numpy_helper.to_array(inits[pad.input[1]])]
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            continue
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s.decode() not in ("", "NOTSET"):
            continue
        spatial = rank - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
        new = [old[i] + begin[2 + i] for i in range(spatial)] + [old[spatial + i] + end[2 + i] for i in range(spatial)]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend([*kept, onnx.helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        fused += 1
    if fused:
        _prune(model)
    return fused


def sort_topologically(model: onnx.ModelProto) -> onnx.ModelProto:
    """Order the nodes so that each comes after the producers of its inputs (in place; also
    returned). ONNX Runtime's float16 converter appends the casts of the graph inputs at the end,
    which onnx.checker rejects."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        placed = [n for n in pending if all(i in ready for i in n.input)]
        if not placed:
            raise ValueError(f"the graph has a cycle or a missing input at {[n.name for n in rest[:3]]}")
        for n in placed:
            ordered.append(n)
            ready.update(n.output)
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model

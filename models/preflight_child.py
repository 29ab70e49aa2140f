"""The child side of the ONNX preflight (models/preflight.py): run as a script in its own process.

It imports nothing from the project (a crash, a hang or a huge allocation here cannot touch the
caller), reads the file once, and checks it in order: a readable ONNX protobuf, no external data
anywhere (initializers, sparse initializers, constants inside nodes and subgraphs), the declared
input and outputs, then an ONNX Runtime CPU session built from the bytes it read (so that no path
next to the file can be followed) and one run on a batch of 2, whose outputs must have the
expected shapes and be finite. It prints one JSON line: ``{"ok": true, ...}`` or
``{"ok": false, "problem": "..."}``; anything else (a signal, a non-zero exit) is a crash.

Usage: ``python preflight_child.py MODEL.onnx EXPECTATION_JSON [OPTIONS_JSON]``; options:
``providers`` (ONNX Runtime provider names, in order: the ones the caller will run the graph on;
default CPU) and ``memory_limit`` (bytes of address space this process may use: a graph that
allocates more fails here instead of taking the caller's memory).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

PROBE_BATCH = 2


class RefusedError(Exception):
    pass


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds, subgraphs (If, Loop, Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_declared(model: Any, expect: dict[str, Any]) -> None:
    import onnx

    graph = model.graph
    external = [t.name or "<unnamed>" for t in _tensors(graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RefusedError(
            f"the graph references external data files (tensors {', '.join(external[:3])}); "
            "weights must be inside model.onnx"
        )
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if names != [expect["input"]]:
        raise RefusedError(f"the graph's inputs are {names}, expected exactly one named {expect['input']!r}")
    (inp,) = inputs
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RefusedError(f"input {expect['input']!r} must be float32")
    dims = _dims(inp)
    want = ["batch", 3, expect["crop"], expect["crop"]]
    if len(dims) != 4 or dims[1:] != want[1:] or isinstance(dims[0], int):
        raise RefusedError(f"input {expect['input']!r} has shape {dims}, expected {want} with a dynamic batch axis")
    outputs = [o.name for o in graph.output]
    if outputs != expect["outputs"]:
        raise RefusedError(f"the graph's outputs are {outputs}, expected {expect['outputs']}")
    for out, width in zip(graph.output, (expect["num_classes"], expect["feature_dim"]), strict=True):
        odims = _dims(out)
        if not odims:
            continue  # no declared shape: the run below checks the real one
        if len(odims) != 2 or (isinstance(odims[1], int) and odims[1] != width):
            raise RefusedError(f"output {out.name!r} is declared with shape {odims}, expected [batch, {width}]")


def _check_runs(data: bytes, expect: dict[str, Any], providers: list[str]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:
        raise RefusedError(f"ONNX Runtime cannot load the graph: {str(e).strip()[:500]}") from None
    crop = expect["crop"]
    batch = np.zeros((PROBE_BATCH, 3, crop, crop), dtype=np.float32)
    try:
        results = session.run(expect["outputs"], {expect["input"]: batch})
    except Exception as e:
        raise RefusedError(
            f"ONNX Runtime fails to run the graph on a batch of {PROBE_BATCH}: {str(e).strip()[:500]}"
        ) from None
    shapes = {}
    for name, width, value in zip(
        expect["outputs"], (expect["num_classes"], expect["feature_dim"]), results, strict=True
    ):
        arr = np.asarray(value)
        shapes[name] = list(arr.shape)
        if arr.shape != (PROBE_BATCH, width):
            raise RefusedError(
                f"output {name!r} has shape {list(arr.shape)} for a batch of {PROBE_BATCH}, expected [{PROBE_BATCH}, {width}]"
            )
        if arr.dtype != np.float32 or not np.isfinite(arr).all():
            raise RefusedError(f"output {name!r} is not finite float32 (dtype {arr.dtype})")
    return shapes


def check(path: str, expect: dict[str, Any], providers: list[str] | None = None) -> dict[str, Any]:
    import onnx

    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise RefusedError(f"not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    if not model.HasField("graph"):
        raise RefusedError("not an ONNX model (no graph)")
    _check_declared(model, expect)
    shapes = _check_runs(data, expect, providers or ["CPUExecutionProvider"])
    return {"ok": True, "sha256": digest, "output_shapes": shapes, "opset": [o.version for o in model.opset_import]}


def limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> int:
    path, expect = argv[1], json.loads(argv[2])
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    if options.get("memory_limit"):
        limit_memory(int(options["memory_limit"]))
    try:
        result = check(path, expect, options.get("providers"))
    except RefusedError as e:
        result = {"ok": False, "problem": str(e)}
    except OSError as e:
        result = {"ok": False, "problem": f"cannot read the file: {e}"}
    except MemoryError:
        result = {"ok": False, "problem": "loading or running the graph needs more memory than allowed"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

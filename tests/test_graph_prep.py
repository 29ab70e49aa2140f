"""Folding the shape arithmetic of a graph: exact, and the batch axis stays dynamic."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.graph_prep import fold_static_shapes, sort_topologically
from models.spec import ONNX_FILENAME


def _same_padding_graph() -> onnx.ModelProto:
    """TensorFlow-style "same" padding as timm exports it: pads computed from Shape at run time."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 7, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 7, "padded"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [])
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "idx_w"),
        numpy_helper.from_array(np.array(0, np.int64), "idx_n"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.zeros(7, np.int64), "zeros7"),
    ]
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "idx_w"], ["w"]),
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["wf", "two"], ["half"]),
        helper.make_node("Ceil", ["half"], ["up"]),
        helper.make_node("Cast", ["up"], ["pad"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["pad", "axis0"], ["pad1"]),
        helper.make_node("Concat", ["zeros7", "pad1"], ["pads"], axis=0),
        helper.make_node("Pad", ["input", "pads"], ["y"]),
        helper.make_node("Gather", ["shape", "idx_n"], ["n"]),  # the batch size: must stay dynamic
    ]
    graph = helper.make_graph(nodes, "same_pad", [x], [y, n], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def test_static_shape_arithmetic_folds_and_the_batch_stays_dynamic() -> None:
    original = _same_padding_graph()
    folded = fold_static_shapes(_same_padding_graph())
    ops = [n.op_type for n in folded.graph.node]
    assert "Ceil" not in ops and "Div" not in ops and "Concat" not in ops
    assert ops.count("Shape") == 1 and ops.count("Gather") == 1  # only the batch-size lookup is left
    onnx.checker.check_model(folded, full_check=True)
    for batch in (1, 4):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 7, 9)).astype(np.float32)
        want, got = _run(original, x), _run(folded, x)
        assert got[0].shape == (batch, 3, 7, 14)  # ceil(9 / 2) = 5 columns of padding
        np.testing.assert_array_equal(got[0], want[0])
        assert int(got[1]) == batch


def test_a_zero_pad_before_a_conv_becomes_the_conv_padding() -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 9, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, None, None])
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "pads"),
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("Pad", ["input", "pads", "zero"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["y"], strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "pad_conv", [x], [y], initializer=inits)
    make = lambda: helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # noqa: E731
    folded = fold_static_shapes(make())
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    conv = folded.graph.node[0]
    assert next(a.ints for a in conv.attribute if a.name == "pads") == [0, 1, 1, 2]
    x_val = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x_val)[0], _run(make(), x_val)[0], atol=1e-5)


def test_sort_topologically_fixes_appended_producers() -> None:
    model = _same_padding_graph()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[::-1])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx.checker.check_model(sort_topologically(model))


@pytest.mark.slow
def test_lite0_export_has_no_shape_arithmetic_left(lite0_registry) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(lite0_registry.get("efficientnet_lite0").file(ONNX_FILENAME)))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Shape", "Gather", "Ceil", "ConstantOfShape"}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_a_shape_of_unknown_rank_is_left_alone() -> None:
    """Shape of a tensor whose rank inference cannot know (a Reshape to a run-time shape): nothing
    to fold, and no error."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    shp = helper.make_tensor_value_info("shp", TensorProto.INT64, None)
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "shp"], ["u"]),
        helper.make_node("Shape", ["u"], ["s"]),
        helper.make_node("Gather", ["s", "i"], ["y"], axis=0),
    ]
    init = [numpy_helper.from_array(np.array(1, dtype=np.int64), "i")]
    graph = helper.make_graph(nodes, "unknown_rank", [x, shp], [y], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    fold_static_shapes(model)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Reshape", "Shape", "Gather"]

"""The ONNX Runtime session factory, tested without HTTP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.inference import InferenceModel, softmax, top_k
from models.runtime import CPU, CUDA, TRT, OnnxSession, gpu_driver_present, select_providers, trt_cache_dir
from models.settings import Settings

ALL = [TRT, CUDA, CPU]


def test_auto_prefers_tensorrt_then_cuda_when_a_gpu_is_present(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chosen = select_providers("auto", ALL, gpu=True, trt_fp16=True, trt_cache_dir=tmp_path)
    assert [p for p, _ in chosen] == [TRT, CUDA, CPU]
    trt = dict(chosen)[TRT]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert [p for p, _ in select_providers("auto", [CUDA, CPU], gpu=True)] == [CUDA, CPU]


def test_auto_is_cpu_without_a_gpu_even_when_gpu_providers_are_installed() -> None:
    assert select_providers("auto", ALL, gpu=False) == [(CPU, {})]
    assert select_providers("cpu", ALL, gpu=True) == [(CPU, {})]


def test_an_explicit_gpu_choice_that_cannot_be_honoured_says_why() -> None:
    with pytest.raises(RuntimeError, match="no NVIDIA driver"):
        select_providers("cuda", ALL, gpu=False)
    with pytest.raises(RuntimeError, match="has no TensorrtExecutionProvider"):
        select_providers("tensorrt", [CUDA, CPU], gpu=True)


def test_session_runs_on_cpu_here(tiny_version) -> None:  # type: ignore[no-untyped-def]
    session = OnnxSession(tiny_version.file("model.onnx"), settings=Settings(providers="auto"), threads=1)
    if not gpu_driver_present():
        assert session.providers == [CPU]
    out = session.run(np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32))
    assert out.logits.shape == (4, 10) and np.isfinite(out.logits).all()
    assert session.session.get_session_options().intra_op_num_threads == 1


def test_session_refuses_a_graph_without_logits_and_features(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["y"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    with pytest.raises(ValueError, match="expected one input 'input' and outputs"):
        OnnxSession(path, settings=Settings(providers="cpu"))


def test_top_k_is_sorted_softmax() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    preds = top_k(logits, ["a", "b", "c"], 2)
    assert [[p.label for p in row] for row in preds] == [["b", "c"], ["c", "a"]]
    assert preds[0][0].score == pytest.approx(softmax(logits)[0, 1])
    assert sum(p.score for p in top_k(logits, ["a", "b", "c"], 10)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        top_k(logits, ["a", "b", "c"], 0)


def test_inference_model_classifies_and_embeds(tiny_registry, image_files) -> None:  # type: ignore[no-untyped-def]
    model = InferenceModel.load("tiny_cnn", registry=tiny_registry)
    preds = model.classify(image_files, k=3)
    assert len(preds) == 3 and all(len(p) == 3 for p in preds)
    emb = model.embed(image_files)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    # the same image gives the same vector, whatever batch it is in
    np.testing.assert_allclose(model.embed(image_files[:1])[0], emb[0], atol=1e-5)


def test_tensorrt_options_cover_fp16_caches_and_a_batch_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chosen = dict(
        select_providers(
            "tensorrt",
            ALL,
            gpu=True,
            trt_fp16=False,
            trt_cache_dir=tmp_path,
            trt_profile=(1, 8, 32),
            input_shape=(3, 224, 224),
        )
    )
    trt = chosen[TRT]
    assert trt["trt_fp16_enable"] == "False"
    assert trt["trt_timing_cache_enable"] == "True" and trt["trt_timing_cache_path"] == str(tmp_path)
    assert trt["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == "input:8x3x224x224"
    assert trt["trt_profile_max_shapes"] == "input:32x3x224x224"
    assert "trt_profile_min_shapes" not in dict(select_providers("tensorrt", ALL, gpu=True))[TRT]


def test_profile_batches_setting_is_checked_when_read() -> None:
    assert Settings(trt_profile_batches="1,8,32").trt_profile() == (1, 8, 32)
    assert Settings(trt_profile_batches="4").trt_profile() == (1, 4, 4)  # any batch up to 4, tuned for 4
    assert Settings(trt_profile_batches="1, 16").trt_profile() == (1, 16, 16)
    assert Settings().trt_profile() is None
    # the service warms up and answers lone requests at batch 1: a profile must start there
    for bad in ("a", "8,1", "0,4", "1,2,3,4", "2,16", "4,8,32"):
        with pytest.raises(ValueError):
            Settings(trt_profile_batches=bad)


def test_trt_cache_defaults_beside_the_registry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert trt_cache_dir(Settings(bentoml_home=tmp_path)) == tmp_path.resolve() / "backbones" / "trt-cache"
    assert trt_cache_dir(Settings(bentoml_home=tmp_path, trt_cache_dir=tmp_path / "c")) == tmp_path / "c"


def test_io_binding_gives_the_outputs_of_a_plain_run(tiny_version) -> None:  # type: ignore[no-untyped-def]
    """The path CUDA/TensorRT sessions take, exercised on the CPU provider."""
    settings = Settings(providers="cpu")
    plain = OnnxSession(tiny_version.file("model.onnx"), settings=settings)
    bound = OnnxSession(tiny_version.file("model.onnx"), settings=settings, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    x = np.random.default_rng(1).normal(size=(5, 3, 64, 64)).astype(np.float32)
    a, b = plain.run(x), bound.run(x)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.features, b.features)
    assert bound.run(x[:2]).logits.shape == (2, 10)  # a new batch shape needs no new binding


def test_a_session_with_a_batch_limit_runs_larger_batches_in_chunks(tiny_version) -> None:  # type: ignore[no-untyped-def]
    """A TensorRT engine built for batches up to MAX gets larger batches MAX at a time; the rows
    come back in order (checked here on the CPU with the limit set by hand)."""
    session = OnnxSession(tiny_version.file("model.onnx"), settings=Settings(providers="cpu"), threads=1)
    assert session.max_batch is None  # no TensorRT: no limit
    batch = np.random.default_rng(0).standard_normal((7, *session.input_shape[1:])).astype(np.float32)
    whole = session.run(batch)
    session.max_batch = 3
    chunked = session.run(batch)
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.features, whole.features, rtol=1e-5, atol=1e-6)

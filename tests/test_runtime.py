"""The ONNX Runtime session factory, tested without HTTP."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models import runtime
from models.cores import batch_plan
from models.inference import InferenceModel, softmax, top_k
from models.runtime import (
    CPU,
    CUDA,
    TRT,
    OnnxSession,
    Outputs,
    batch_shapes,
    gpu_driver_present,
    padded_size,
    provider_problems,
    select_providers,
    serving_plan,
    trt_cache_dir,
    usable_providers,
)
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


def test_an_explicit_gpu_choice_names_the_library_that_does_not_load() -> None:
    problems = {TRT: "libnvinfer.so.10 could not be loaded"}
    with pytest.raises(RuntimeError, match=r"providers=tensorrt .* libnvinfer\.so\.10 could not be loaded"):
        select_providers("tensorrt", [CUDA, CPU], gpu=True, problems=problems)
    # auto simply leaves it out
    assert [p for p, _ in select_providers("auto", [CUDA, CPU], gpu=True, problems=problems)] == [CUDA, CPU]


def test_gpu_providers_that_cannot_run_are_not_offered(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime-gpu lists CUDA and TensorRT wherever it is installed; only the ones whose driver
    and libraries load here are usable (checked with the real library loader)."""
    import onnxruntime as ort

    listed = ort.get_available_providers()
    problems = provider_problems()
    assert set(usable_providers()) == set(listed) - set(problems)
    assert CPU in usable_providers()
    if not gpu_driver_present():
        assert all(why == "no NVIDIA driver was found" for why in problems.values())
        assert not {TRT, CUDA} & set(usable_providers())
    # a library that is not on this machine is reported by name
    assert not runtime._loads("libbackbones-nonexistent.so.1")
    monkeypatch.setattr(runtime, "TRT_LIBRARIES", ("libbackbones-nonexistent.so.1",))
    monkeypatch.setattr(runtime, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    provider_problems.cache_clear()
    try:
        if TRT in listed:
            assert "libbackbones-nonexistent.so.1" in runtime.provider_problems()[TRT]
    finally:
        provider_problems.cache_clear()


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


def test_cuda_options_carry_the_tf32_choice() -> None:
    assert dict(select_providers("cuda", ALL, gpu=True))[CUDA]["use_tf32"] == "1"
    assert dict(select_providers("cuda", ALL, gpu=True, cuda_tf32=False))[CUDA]["use_tf32"] == "0"
    assert dict(select_providers("auto", ALL, gpu=True, cuda_tf32=False))[CUDA]["use_tf32"] == "0"


def test_batches_pad_to_powers_of_two() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 64]
    assert batch_shapes(1) == [1] and batch_shapes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_shapes(24) == [1, 2, 4, 8, 16, 32]  # 17..24 run as 32


def test_a_padding_session_returns_exactly_the_rows_it_was_given(tiny_version) -> None:  # type: ignore[no-untyped-def]
    """The padding CUDA sessions do, exercised on the CPU provider: 5 rows run as 8, 5 come back,
    each equal to its row run alone."""
    session = OnnxSession(tiny_version.file("model.onnx"), settings=Settings(providers="cpu"), threads=1)
    assert not session.pad_batches  # only CUDA pads
    session.pad_batches = True
    batch = np.random.default_rng(2).standard_normal((5, *session.input_shape[1:])).astype(np.float32)
    seen: list[int] = []
    plain_run = session._run

    def counting_run(b: np.ndarray) -> Outputs:
        seen.append(len(b))
        return plain_run(b)

    session._run = counting_run  # type: ignore[method-assign]
    out = session.run(batch)
    assert seen == [8] and out.logits.shape == (5, 10) and out.features.shape[0] == 5
    alone = np.concatenate([plain_run(batch[i : i + 1]).logits for i in range(5)])
    np.testing.assert_allclose(out.logits, alone, rtol=1e-5, atol=1e-5)
    assert session.warmup_batches(5) == [1, 2, 4, 8] and seen[-4:] == [1, 2, 4, 8]
    # each padded size runs on a session of its own (a shape change rebuilds CUDA's conv plans)
    assert session.batch_sessions == [1, 2, 4, 8]
    assert len({id(session.session_for(n)) for n in (1, 2, 4, 8)}) == 4
    assert session.session_for(8) is session.session  # the first size asked for (here 8) takes the first session


def test_serving_plan_on_cpu_and_gpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    monkeypatch.setattr(runtime, "on_gpu", lambda settings=None: False)
    cpu = serving_plan(Settings())
    # every worker may use every core: connections land unevenly on the workers
    assert (cpu.workers, cpu.runners, cpu.intra_op_threads, cpu.decode_threads) == (16, 16, 1, 16)
    monkeypatch.setattr(runtime, "on_gpu", lambda settings=None: True)
    gpu = serving_plan(Settings())
    assert (gpu.workers, gpu.runners, gpu.decode_threads) == (16, 1, 1)
    assert serving_plan(Settings(workers=4)).decode_threads == 4  # with a GPU, each its share of the cores
    monkeypatch.setattr(runtime, "available_cores", lambda: 64)
    assert serving_plan(Settings()).workers == 16  # CUDA contexts are not free
    monkeypatch.setattr(runtime, "on_gpu", lambda settings=None: False)
    assert serving_plan(Settings()).workers == 64


# -- how the cores are spread: the numbers chosen on small and large machines ----------------------

# (cores, gpu) -> (decode workers, ONNX Runtime calls at once, intra-op threads per call) of the batch job
BATCH_PLANS = {
    (1, False): (1, 1, 1),
    (2, False): (1, 2, 1),
    (3, False): (1, 3, 1),
    (4, False): (2, 4, 1),
    (16, False): (8, 16, 1),
    (64, False): (32, 64, 1),
    (1, True): (1, 1, 1),
    (2, True): (2, 1, 2),
    (16, True): (16, 1, 16),
    (64, True): (64, 1, 64),
}
# (cores, gpu, workers setting) -> (workers, runners, intra-op threads, decode threads) of the service
SERVING_PLANS = {
    (1, False, 0): (1, 1, 1, 1),
    (2, False, 0): (2, 2, 1, 2),
    (16, False, 0): (16, 16, 1, 16),
    (16, False, 2): (2, 16, 1, 16),
    (2, True, 0): (2, 1, 1, 1),
    (16, True, 0): (16, 1, 1, 1),
    (16, True, 2): (2, 1, 8, 8),
    (64, True, 0): (16, 1, 4, 4),
    (64, False, 0): (64, 64, 1, 64),
}


def _batch_plan(cores: int, gpu: bool, threads: int | None) -> tuple[int, int, int]:
    plan = batch_plan(cores, gpu=gpu, threads=threads)
    return plan.workers, plan.runners, plan.threads


@pytest.mark.parametrize(("cores", "gpu"), sorted(BATCH_PLANS))
def test_the_batch_job_spreads_decoding_and_inference_over_the_cores(cores: int, gpu: bool) -> None:
    assert _batch_plan(cores, gpu, None) == BATCH_PLANS[cores, gpu]
    # --threads: one call on that many threads; the decode workers stay as they were
    assert _batch_plan(cores, gpu, 3) == (BATCH_PLANS[cores, gpu][0], 1, 3)
    # --workers wins; the intra_op_threads setting only changes a lone call's threads
    assert batch_plan(cores, gpu=gpu, workers=0).workers == 0
    lone = batch_plan(cores, gpu=gpu, lone_call_threads=5)
    assert (lone.runners, lone.threads) == ((1, 5) if BATCH_PLANS[cores, gpu][1] == 1 else BATCH_PLANS[cores, gpu][1:])


@pytest.mark.parametrize(("cores", "gpu", "workers"), sorted(SERVING_PLANS))
def test_the_service_spreads_workers_runners_and_threads_over_the_cores(  # type: ignore[no-untyped-def]
    monkeypatch, cores: int, gpu: bool, workers: int
) -> None:
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    monkeypatch.setattr(runtime, "on_gpu", lambda settings=None: gpu)
    plan = serving_plan(Settings(workers=workers))
    assert (plan.workers, plan.runners, plan.intra_op_threads, plan.decode_threads) == SERVING_PLANS[
        cores, gpu, workers
    ]


@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
def test_ray_actors_take_two_cpus_each_and_spread_them_as_the_batch_job_does(cpus: int) -> None:
    from embed.ray_engine import plan_actors

    plan = plan_actors({"CPU": float(cpus)}, actors=None, gpus_per_actor=0.0, threads=None, workers=None)
    assert (plan.actors, plan.decode_threads, plan.runners, plan.threads) == (max(1, cpus // 2), 1, 2, 1)
    assert (plan.decode_threads, plan.runners, plan.threads) == BATCH_PLANS[2, False]


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2: a pod with limits.cpu 2
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_a_cpu_limit_bounds_the_cores_a_process_counts(tmp_path, files: dict[str, str], quota: float | None) -> None:  # type: ignore[no-untyped-def]
    """In a container the affinity is the node's cores; the CPU quota is what the pod may use."""
    import math
    import os

    from models.cores import available_cores, cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (min(affinity, math.ceil(quota)) if quota else affinity)

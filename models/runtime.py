"""The ONNX Runtime session factory: execution providers, threads and warm-up in one place."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .cores import ServingPlan, available_cores, plan_serving
from .settings import ProviderChoice, Settings, get_settings
from .spec import INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

ProviderSpec = tuple[str, dict[str, str]]


@cache
def gpu_driver_present() -> bool:
    """An NVIDIA driver is loadable. onnxruntime-gpu lists CUDA/TensorRT as available even on
    machines without one, so availability alone is not enough to choose them."""
    return _loads("libcuda.so.1")


# TensorRT 10 is what the TensorRT provider of onnxruntime-gpu 1.2x/1.3x links against.
TRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _cuda_libraries() -> tuple[str, ...]:
    """The CUDA and cuDNN libraries onnxruntime-gpu's CUDA provider needs, for the CUDA major
    version it was built with."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:  # a CPU-only onnxruntime
        return ()
    major = str(cuda_version or "").split(".")[0]
    if not major.isdigit():
        return ()
    return (f"libcudart.so.{major}", f"libcublasLt.so.{major}", f"libcublas.so.{major}", "libcudnn.so.9")


@cache
def provider_problems() -> dict[str, str]:
    """Why each GPU provider this onnxruntime lists cannot run here (absent: it can).

    onnxruntime-gpu lists CUDA and TensorRT wherever it is installed. Without an NVIDIA driver, the
    CUDA/cuDNN libraries of its CUDA version, or (TensorRT) libnvinfer, a session asked for them
    falls back with a page of text on stdout, or fails. The CUDA and cuDNN libraries of the
    nvidia-* wheels that PyTorch installs are loaded first (``onnxruntime.preload_dlls``)."""
    listed = [p for p in (TRT, CUDA) if p in ort.get_available_providers()]
    if not listed:
        return {}
    if not gpu_driver_present():
        return dict.fromkeys(listed, "no NVIDIA driver was found")
    if hasattr(ort, "preload_dlls"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # it prints what it could not load
            ort.preload_dlls()
        if printed.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())
    cuda_libs = _cuda_libraries()
    missing_cuda = [lib for lib in cuda_libs if not _loads(lib)] if cuda_libs else ["a CUDA build of onnxruntime"]
    problems: dict[str, str] = {}
    if missing_cuda:
        problems[CUDA] = f"{', '.join(missing_cuda)} could not be loaded"
    if TRT in listed:
        missing = missing_cuda + [lib for lib in TRT_LIBRARIES if not _loads(lib)]
        if missing:
            problems[TRT] = f"{', '.join(missing)} could not be loaded"
    for name, why in problems.items():
        if name in listed:
            log.warning("%s is installed but cannot run here: %s", name, why)
    return {name: why for name, why in problems.items() if name in listed}


def usable_providers() -> list[str]:
    """The providers this onnxruntime lists that can run on this machine, in its order."""
    problems = provider_problems()
    return [p for p in ort.get_available_providers() if p not in problems]


def on_gpu(settings: Settings | None = None) -> bool:
    """Whether sessions made with these settings will run on an NVIDIA GPU."""
    if (settings or get_settings()).providers == "cpu":
        return False
    return any(p in usable_providers() for p in (TRT, CUDA))


def serving_plan(settings: Settings) -> ServingPlan:
    """The serving layout for these settings on this machine (:func:`models.cores.plan_serving`;
    0 in a setting means: choose)."""
    return plan_serving(
        available_cores(),
        gpu=on_gpu(settings),
        workers=settings.workers,
        runners=settings.runners,
        threads=settings.intra_op_threads,
        decode_threads=settings.decode_threads,
    )


def select_providers(
    choice: ProviderChoice,
    available: Sequence[str],
    *,
    gpu: bool,
    trt_fp16: bool = True,
    cuda_tf32: bool = True,
    trt_cache_dir: Path | None = None,
    trt_profile: tuple[int, int, int] | None = None,
    input_shape: Sequence[int] | None = None,
    problems: dict[str, str] | None = None,
) -> list[ProviderSpec]:
    """Providers in priority order with their options.

    ``auto``: TensorRT, then CUDA, then CPU, as far as each is installed and a GPU is present.
    An explicit ``cuda`` or ``tensorrt`` that cannot be honoured is an error, not a silent fallback
    (``problems``: why a provider missing from ``available`` cannot run, for that error).
    TensorRT: FP16 kernels when ``trt_fp16``; engine and timing caches in ``trt_cache_dir`` (an
    engine build takes minutes, a cached one loads in seconds); with ``trt_profile`` (min, opt, max
    batch) and ``input_shape`` (C, H, W) one engine covers every batch in that range instead of one
    engine per batch shape met.
    """
    chain: list[str]
    if choice == "cpu":
        chain = [CPU]
    elif choice == "cuda":
        chain = [CUDA, CPU]
    elif choice == "tensorrt":
        chain = [TRT, CUDA, CPU]
    else:
        chain = [p for p in (TRT, CUDA) if gpu and p in available] + [CPU]
    if choice in ("cuda", "tensorrt"):
        wanted = TRT if choice == "tensorrt" else CUDA
        if wanted not in available or not gpu:
            why = (
                "no NVIDIA driver was found"
                if not gpu
                else (problems or {}).get(wanted) or f"this onnxruntime has no {wanted}"
            )
            raise RuntimeError(f"providers={choice} was asked for, but {why}; use providers=auto or cpu")
    specs: list[ProviderSpec] = []
    for name in chain:
        opts: dict[str, str] = {}
        if name == TRT:
            opts = {
                "trt_fp16_enable": str(trt_fp16),
                "trt_engine_cache_enable": "True",
                "trt_timing_cache_enable": "True",
            }
            if trt_cache_dir is not None:
                opts["trt_engine_cache_path"] = str(trt_cache_dir)
                opts["trt_timing_cache_path"] = str(trt_cache_dir)
            if trt_profile is not None and input_shape is not None:
                chw = "x".join(str(int(d)) for d in input_shape)
                for key, batch in zip(("min", "opt", "max"), trt_profile, strict=True):
                    opts[f"trt_profile_{key}_shapes"] = f"{INPUT_NAME}:{batch}x{chw}"
        elif name == CUDA:
            # EXHAUSTIVE times every cuDNN algorithm once per input shape (a second or so):
            # OnnxSession pads batches to a few shapes and warms them, so that cost is paid at load
            opts = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1" if cuda_tf32 else "0"}
        specs.append((name, opts))
    return specs


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # (batch, num_classes)
    features: np.ndarray  # (batch, feature_dim)

    @classmethod
    def concatenate(cls, parts: Sequence[Outputs]) -> Outputs:
        """The outputs of consecutive parts of one batch, as one batch's."""
        return cls(
            logits=np.concatenate([p.logits for p in parts]), features=np.concatenate([p.features for p in parts])
        )


# Images per call when a batch runs as concurrent single-threaded calls (models.cores.ort_layout).
MICRO_BATCH = 2


class ConcurrentRunner:
    """Runs a batch through ``run`` (a session's or model's): one call, or micro-batches of
    :data:`MICRO_BATCH` on ``runners`` threads at once (ONNX Runtime sessions take concurrent
    calls). Rows come back in input order."""

    def __init__(self, run: Callable[[np.ndarray], Outputs], runners: int) -> None:
        self._run = run
        self.pool = ThreadPoolExecutor(runners, thread_name_prefix="ort") if runners > 1 else None

    def run(self, pixels: np.ndarray) -> Outputs:
        if self.pool is None or len(pixels) <= MICRO_BATCH:
            return self._run(pixels)
        micro = np.split(pixels, range(MICRO_BATCH, len(pixels), MICRO_BATCH))
        return Outputs.concatenate(list(self.pool.map(self._run, micro)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class OnnxSession:
    """An ONNX Runtime session over one ``model.onnx`` with outputs ``logits`` and ``features``."""

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        settings: Settings | None = None,
        threads: int | None = None,
        warmup_batch: int = 1,
        io_binding: bool | None = None,
    ) -> None:
        """``model``: a file, or the bytes of one (what was hashed and checked is what runs:
        :func:`models.inference.open_version`). ``io_binding``: run through ONNX Runtime's IO
        binding (default: on CUDA/TensorRT when the ``io_binding`` setting is on)."""
        settings = settings or get_settings()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One inference at a time per session uses all its threads; callers that run several
        # sessions side by side (decode workers, several models) pass ``threads`` to share cores.
        opts.intra_op_num_threads = threads or settings.intra_op_threads or available_cores()
        opts.inter_op_num_threads = 1
        if not settings.intra_op_spinning:
            # idle ORT threads would busy-wait for the next op, taking the core from decoding
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        # onnxruntime's process-wide logger warns about each plugin device it does not find
        ort.set_default_logger_severity(3)
        providers = session_providers(settings, model)
        self.path = Path(model) if not isinstance(model, bytes) else None
        source = model if isinstance(model, bytes) else str(model)
        self._new_session = functools.partial(ort.InferenceSession, source, sess_options=opts, providers=providers)
        self.session = self._new_session()
        self.providers: list[str] = self.session.get_providers()
        on_device = self.providers[0] in (TRT, CUDA)
        self.io_binding = (on_device and settings.io_binding) if io_binding is None else io_binding
        self._device = "cuda" if on_device else "cpu"
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or set(outputs) != set(OUTPUT_NAMES):
            raise ValueError(
                f"{self.path or 'the graph'}: expected one input {INPUT_NAME!r} and outputs {OUTPUT_NAMES}, "
                f"got inputs {[i.name for i in inputs]} and outputs {outputs}"
            )
        self.input_shape: list[Any] = list(inputs[0].shape)
        # a TensorRT engine built for a batch range takes nothing larger: bigger batches go in chunks
        profile = settings.trt_profile() if self.providers[0] == TRT else None
        self.max_batch: int | None = profile[2] if profile else None
        # ONNX Runtime's CUDA convolutions (the cuDNN frontend) rebuild their execution plans each
        # time a call's input shape differs from the previous call's (most of a second; see
        # docs/benchmarks.md), so a server alternating batch sizes on one session paid that on
        # nearly every batch. On CUDA, batches are padded to the next power of two and each of
        # those sizes runs on a session of its own, whose plans stay built.
        self.pad_batches = self.providers[0] == CUDA
        self._by_size: dict[int, ort.InferenceSession] = {}
        self._sizes_lock = threading.Lock()
        if warmup_batch:
            self.warmup(warmup_batch)

    def warmup(self, batch: int = 1) -> None:
        """Run once so that the first real request does not pay for lazy initialisation."""
        shape = [batch] + [int(d) for d in self.input_shape[1:]]
        self.run(np.zeros(shape, dtype=np.float32))

    def warmup_batches(self, largest: int) -> list[int]:
        """Run every batch shape that batches of 1..``largest`` images run as (where batches are
        padded: the powers of two up to it, each on its own session, made now), so none pays for
        its first call while serving."""
        sizes = batch_shapes(largest) if self.pad_batches else [1, largest]
        for size in sorted(set(sizes)):
            self.warmup(size)
        return sizes

    def run(self, batch: np.ndarray) -> Outputs:
        if self.max_batch is not None and len(batch) > self.max_batch:
            return Outputs.concatenate(
                [self.run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            )
        n = len(batch)
        if self.pad_batches and n & (n - 1):
            padded = np.zeros((padded_size(n), *batch.shape[1:]), dtype=np.float32)
            padded[:n] = batch
            out = self._run(padded)
            return Outputs(logits=out.logits[:n], features=out.features[:n])
        return self._run(batch)

    def session_for(self, size: int) -> ort.InferenceSession:
        """The session that runs batches of ``size``: one per size where batches are padded (the
        first size asked for takes the session made at start), else the one session."""
        if not self.pad_batches:
            return self.session
        found = self._by_size.get(size)
        if found is None:
            with self._sizes_lock:
                found = self._by_size.get(size)
                if found is None:
                    found = self._new_session() if self._by_size else self.session
                    self._by_size[size] = found
                    log.debug("%s: a session for batches of %d", self.path, size)
        return found

    @property
    def batch_sessions(self) -> list[int]:
        """The batch sizes that have a session of their own (where batches are padded)."""
        return sorted(self._by_size)

    def _run(self, batch: np.ndarray) -> Outputs:
        array = np.ascontiguousarray(batch, dtype=np.float32)
        session = self.session_for(len(array))
        if self.io_binding:
            # The input is copied to the device once and the outputs are left where the provider
            # made them until both are copied back together: no per-output staging by run().
            binding = session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, array)
            for name in OUTPUT_NAMES:
                binding.bind_output(name, self._device)
            session.run_with_iobinding(binding)
            logits, features = binding.copy_outputs_to_cpu()
        else:
            logits, features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return Outputs(logits=logits, features=features)


def padded_size(n: int) -> int:
    """The batch size a batch of ``n`` runs as where batches are padded: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def batch_shapes(largest: int) -> list[int]:
    """The padded batch sizes that batches of 1..``largest`` images run as: 1, 2, 4 .. and the
    power of two at or above ``largest``."""
    return [1 << i for i in range(padded_size(largest).bit_length())]


def trt_cache_dir(settings: Settings) -> Path:
    """Where TensorRT keeps engines and timing caches: the setting, else beside the registry."""
    if settings.trt_cache_dir is not None:
        return settings.trt_cache_dir.expanduser()
    from .registry import Registry

    return Registry(settings=settings).own_dir("trt-cache")


def session_providers(settings: Settings, model: str | Path | bytes) -> list[ProviderSpec]:
    """The providers (with their options) a session over ``model`` gets with ``settings``; the
    preflight child runs the graph on the same ones (models/preflight.py)."""
    available = usable_providers()
    gpu = gpu_driver_present()
    trt_cache = trt_cache_dir(settings) if gpu and TRT in available and settings.providers != "cpu" else None
    providers = select_providers(
        settings.providers,
        available,
        gpu=gpu,
        trt_fp16=settings.trt_fp16,
        cuda_tf32=settings.cuda_tf32,
        trt_cache_dir=trt_cache,
        trt_profile=settings.trt_profile(),
        input_shape=_static_chw(model) if trt_cache is not None else None,
        problems=provider_problems(),
    )
    if trt_cache is not None:
        trt_cache.mkdir(parents=True, exist_ok=True)
    return providers


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _static_chw(source: str | Path | bytes) -> tuple[int, int, int] | None:
    """The graph input's (C, H, W) when they are fixed numbers (they are for every exported model)."""
    import onnx

    if isinstance(source, bytes):
        model = onnx.load_model_from_string(source)
    else:
        model = onnx.load(str(source), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if len(dims) != 3 or not all(d.HasField("dim_value") for d in dims):
        return None
    c, h, w = (int(d.dim_value) for d in dims)
    return c, h, w

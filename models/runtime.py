"""The ONNX Runtime session factory: execution providers, threads and warm-up in one place."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

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
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def on_gpu(settings: Settings) -> bool:
    """Whether sessions made with these settings will run on an NVIDIA GPU."""
    if settings.providers == "cpu":
        return False
    available = ort.get_available_providers()
    return gpu_driver_present() and any(p in available for p in (TRT, CUDA))


@dataclass(frozen=True)
class ServingPlan:
    """How a service spreads over the machine: worker processes, and in each worker the ONNX
    Runtime calls that run at once (runners), their intra-op threads, and the decode threads."""

    workers: int
    runners: int
    intra_op_threads: int
    decode_threads: int


def serving_plan(settings: Settings) -> ServingPlan:
    """The serving layout for these settings on this machine (0 in a setting means: choose).

    On a CPU: one worker process per core, each running one single-threaded ONNX Runtime call at
    a time beside one decode thread. On the 2-core development machine this served 65-73 images/s
    over HTTP against 52 for one process with two runners and 47 for one process with one call on
    both cores: in one process, HTTP parsing, decoding and the batcher share one interpreter lock
    (docs/benchmarks.md). On a GPU: one worker, one call at a time, batches as large as measured best."""
    cores = available_cores()
    gpu = on_gpu(settings)
    workers = settings.workers or (1 if gpu else cores)
    per_worker = max(1, cores // workers)
    runners = settings.runners or (1 if gpu else per_worker)
    threads = settings.intra_op_threads or max(1, per_worker // runners)
    decode = settings.decode_threads or per_worker
    return ServingPlan(workers=workers, runners=runners, intra_op_threads=threads, decode_threads=decode)


def select_providers(
    choice: ProviderChoice,
    available: Sequence[str],
    *,
    gpu: bool,
    trt_fp16: bool = True,
    trt_cache_dir: Path | None = None,
    trt_profile: tuple[int, int, int] | None = None,
    input_shape: Sequence[int] | None = None,
) -> list[ProviderSpec]:
    """Providers in priority order with their options.

    ``auto``: TensorRT, then CUDA, then CPU, as far as each is installed and a GPU is present.
    An explicit ``cuda`` or ``tensorrt`` that cannot be honoured is an error, not a silent fallback.
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
            why = "no NVIDIA driver was found" if not gpu else f"this onnxruntime has no {wanted}"
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
            opts = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
        specs.append((name, opts))
    return specs


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # (batch, num_classes)
    features: np.ndarray  # (batch, feature_dim)


class OnnxSession:
    """An ONNX Runtime session over one ``model.onnx`` with outputs ``logits`` and ``features``."""

    def __init__(
        self,
        path: str | Path,
        *,
        settings: Settings | None = None,
        threads: int | None = None,
        warmup_batch: int = 1,
        io_binding: bool | None = None,
    ) -> None:
        """``io_binding``: run through ONNX Runtime's IO binding (default: on CUDA/TensorRT when
        the ``io_binding`` setting is on)."""
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
        available = ort.get_available_providers()
        gpu = gpu_driver_present()
        trt_cache = trt_cache_dir(settings) if gpu and TRT in available and settings.providers != "cpu" else None
        providers = select_providers(
            settings.providers,
            available,
            gpu=gpu,
            trt_fp16=settings.trt_fp16,
            trt_cache_dir=trt_cache,
            trt_profile=settings.trt_profile(),
            input_shape=_static_chw(path) if trt_cache is not None else None,
        )
        if trt_cache is not None:
            trt_cache.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers: list[str] = self.session.get_providers()
        on_device = self.providers[0] in (TRT, CUDA)
        self.io_binding = (on_device and settings.io_binding) if io_binding is None else io_binding
        self._device = "cuda" if on_device else "cpu"
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or set(outputs) != set(OUTPUT_NAMES):
            raise ValueError(
                f"{path}: expected one input {INPUT_NAME!r} and outputs {OUTPUT_NAMES}, "
                f"got inputs {[i.name for i in inputs]} and outputs {outputs}"
            )
        self.input_shape: list[Any] = list(inputs[0].shape)
        # a TensorRT engine built for a batch range takes nothing larger: bigger batches go in chunks
        profile = settings.trt_profile() if self.providers[0] == TRT else None
        self.max_batch: int | None = profile[2] if profile else None
        if warmup_batch:
            self.warmup(warmup_batch)

    def warmup(self, batch: int = 1) -> None:
        """Run once so that the first real request does not pay for lazy initialisation."""
        shape = [batch] + [int(d) for d in self.input_shape[1:]]
        self.run(np.zeros(shape, dtype=np.float32))

    def run(self, batch: np.ndarray) -> Outputs:
        if self.max_batch is not None and len(batch) > self.max_batch:
            parts = [self.run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            return Outputs(
                logits=np.concatenate([p.logits for p in parts]), features=np.concatenate([p.features for p in parts])
            )
        array = np.ascontiguousarray(batch, dtype=np.float32)
        if self.io_binding:
            # The input is copied to the device once and the outputs are left where the provider
            # made them until both are copied back together: no per-output staging by run().
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, array)
            for name in OUTPUT_NAMES:
                binding.bind_output(name, self._device)
            self.session.run_with_iobinding(binding)
            logits, features = binding.copy_outputs_to_cpu()
        else:
            logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return Outputs(logits=logits, features=features)


def trt_cache_dir(settings: Settings) -> Path:
    """Where TensorRT keeps engines and timing caches: the setting, else beside the registry."""
    if settings.trt_cache_dir is not None:
        return settings.trt_cache_dir.expanduser()
    from .registry import Registry

    return Registry(settings=settings).home / "backbones" / "trt-cache"


def _static_chw(path: str | Path) -> tuple[int, int, int] | None:
    """The graph input's (C, H, W) when they are fixed numbers (they are for every exported model)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if len(dims) != 3 or not all(d.HasField("dim_value") for d in dims):
        return None
    c, h, w = (int(d.dim_value) for d in dims)
    return c, h, w

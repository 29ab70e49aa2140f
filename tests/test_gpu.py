"""FP16 and TensorRT on an NVIDIA GPU against the FP32 model. Skipped where there is none (the
development machines); run on a GPU machine with: pytest -m gpu tests/test_gpu.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import Registry
from models.export import verification_batch
from models.fp16 import to_fp16
from models.runtime import CUDA, TRT, OnnxSession, gpu_driver_present, provider_problems
from models.settings import Settings
from models.spec import ONNX_FILENAME

from .conftest import SHARED_DATA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not gpu_driver_present(), reason="no NVIDIA driver on this machine: GPU paths are checked on a GPU machine"
    ),
]


def _need(provider: str) -> None:
    if provider not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {provider}")
    if provider in provider_problems():
        pytest.skip(f"{provider} cannot run here: {provider_problems()[provider]}")


def _photos(pre) -> np.ndarray:  # type: ignore[no-untyped-def]
    folder = SHARED_DATA / "imagenet-sample"
    photos = sorted(folder.iterdir())[:32] if folder.is_dir() else None
    return verification_batch(pre, photos, limit=32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_fp16_on_the_gpu_agrees_with_fp32(lite0_registry: Registry, tmp_path: Path, provider: str) -> None:
    _need(CUDA if provider == "cuda" else TRT)
    stored = lite0_registry.get("efficientnet_lite0")
    fp16 = tmp_path / "fp16.onnx"
    to_fp16(stored.file(ONNX_FILENAME), fp16)
    batch = _photos(stored.spec.preprocess)
    ref = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cpu")).run(batch)
    cache = tmp_path / "trt"
    settings = Settings(providers=provider, trt_cache_dir=cache, trt_profile_batches="1,8,32")  # type: ignore[arg-type]
    session = OnnxSession(fp16, settings=settings)
    assert session.providers[0] == (CUDA if provider == "cuda" else TRT) and session.io_binding
    out = session.run(batch)
    assert out.logits.dtype == np.float32
    assert (out.logits.argmax(1) == ref.logits.argmax(1)).mean() >= 0.97
    assert _cosines(out.features, ref.features).min() >= 0.999
    if provider == "tensorrt":
        assert any(cache.iterdir()), "TensorRT wrote no engine or timing cache"
        for n in (1, 5, 32):  # every batch in the profile runs on the one engine
            assert session.run(batch[:n]).logits.shape == (n, 1000)


def test_fp32_on_cuda_matches_the_cpu(lite0_registry: Registry) -> None:
    """Full FP32 (cuda_tf32 off) agrees with the CPU to float rounding; with TF32 tensor cores (the
    default, as in PyTorch's convolutions) the answers are the same and the numbers close."""
    _need(CUDA)
    stored = lite0_registry.get("efficientnet_lite0")
    batch = _photos(stored.spec.preprocess)
    ref = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cpu")).run(batch)
    exact = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cuda", cuda_tf32=False)).run(batch)
    tf32 = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cuda")).run(batch)
    print(
        "max |logit - CPU|: fp32",
        float(np.abs(exact.logits - ref.logits).max()),
        "tf32",
        float(np.abs(tf32.logits - ref.logits).max()),
    )
    assert (exact.logits.argmax(1) == ref.logits.argmax(1)).all()
    assert np.abs(exact.logits - ref.logits).max() < 1e-2
    assert (tf32.logits.argmax(1) == ref.logits.argmax(1)).all()
    assert _cosines(tf32.features, ref.features).min() >= 0.9999


def test_cuda_pads_batches_to_warm_shapes(lite0_registry: Registry) -> None:
    """On CUDA a batch of 5 runs as 8 (cuDNN searches its algorithms once per shape); the rows
    that come back are the 5 asked for, equal to running them alone."""
    _need(CUDA)
    stored = lite0_registry.get("efficientnet_lite0")
    batch = _photos(stored.spec.preprocess)[:5]
    session = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cuda", cuda_tf32=False))
    assert session.pad_batches and session.warmup_batches(5) == [1, 2, 4, 8]
    out = session.run(batch)
    assert out.logits.shape == (5, 1000) and out.features.shape[0] == 5
    alone = np.concatenate([session.run(batch[i : i + 1]).logits for i in range(5)])
    assert np.abs(out.logits - alone).max() < 1e-3

"""GPU inference throughput by engine, precision and batch size, measured side by side in one run.

For the bundled efficientnet_lite0, exported into a temporary registry, on one NVIDIA GPU:

- ONNX Runtime, CUDA provider: the FP32 export and its FP16 conversion (``models.fp16``, float32
  inputs and outputs), through ``OnnxSession`` exactly as the service runs them (IO binding on);
- ONNX Runtime, TensorRT provider: the FP32 export with FP16 engines and one batch profile
  1..max, where TensorRT's libraries load (else one line says why);
- PyTorch eager on CUDA, FP32 and FP16 weights: what a team would start from.

Every call starts from a preprocessed float32 batch in host memory and ends with the logits and
features in host memory, as a served request does. Batches of 1, 32 and 256 by default; each
configuration is timed for --seconds after a warm-up (cuDNN's algorithm search and TensorRT's
engine build stay out of the numbers), in --rounds interleaved rounds, median reported.

    python benchmarks/bench_gpu.py [--batches 1,32,256] [--seconds 3] [--rounds 2] [--json]

Without a GPU that ONNX Runtime can use it says why and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models import Registry, Settings, get_entry
from models.export import export_catalog
from models.fp16 import to_fp16
from models.runtime import CUDA, TRT, OnnxSession, provider_problems, usable_providers
from models.spec import ONNX_FILENAME

MODEL = "efficientnet_lite0"
MAX_BATCH = 4096
Runner = Callable[[np.ndarray], object]


def time_runner(run: Runner, batch: np.ndarray, seconds: float) -> float:
    """Images per second of ``run`` on ``batch``, after two untimed calls."""
    for _ in range(2):
        run(batch)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        run(batch)
        calls += 1
    return calls * len(batch) / elapsed


def onnx_runner(path: Path, settings: Settings) -> Runner:
    session = OnnxSession(path, settings=settings)
    return session.run


def torch_runner(half: bool) -> Runner:
    import torch

    from models.weights import build_pretrained

    net = build_pretrained(get_entry(MODEL)).cuda().eval()
    if half:
        net = net.half()
    dtype = torch.float16 if half else torch.float32

    def run(batch: np.ndarray) -> object:
        with torch.inference_mode():
            logits, features = net(torch.from_numpy(batch).cuda().to(dtype))
            return logits.float().cpu().numpy(), features.float().cpu().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median counts")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches takes numbers separated by commas, not {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error("--batches must be positive")
    if max(batches) > MAX_BATCH:
        parser.error(f"--batches above {MAX_BATCH}: each image is 0.6 MB of float32 input, that many would not fit")
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds above 0")
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if CUDA not in usable_providers():
        why = provider_problems().get(CUDA, "this onnxruntime has no CUDAExecutionProvider")
        print(f"bench_gpu: no GPU to measure: {why}", file=sys.stderr)
        raise SystemExit(2)

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    reg = Registry(work / "bentoml")
    stored = export_catalog(MODEL, registry=reg)
    fp32 = stored.file(ONNX_FILENAME)
    fp16 = work / "fp16.onnx"
    to_fp16(fp32, fp16)
    cuda = Settings(providers="cuda", bentoml_home=work / "bentoml")
    configs: dict[str, Callable[[], Runner]] = {
        "onnxruntime cuda fp32": lambda: onnx_runner(fp32, cuda),
        "onnxruntime cuda fp16": lambda: onnx_runner(fp16, cuda),
    }
    skipped: dict[str, str] = {}
    if TRT in usable_providers():
        trt = Settings(
            providers="tensorrt",
            bentoml_home=work / "bentoml",
            trt_cache_dir=work / "trt",
            trt_profile_batches=f"1,{max(batches)}",
        )
        configs["onnxruntime tensorrt fp16"] = lambda: onnx_runner(fp32, trt)
    else:
        skipped["onnxruntime tensorrt fp16"] = provider_problems().get(TRT, "this onnxruntime has no TensorRT")
    if not args.no_torch:
        configs["pytorch eager fp32"] = lambda: torch_runner(half=False)
        configs["pytorch eager fp16"] = lambda: torch_runner(half=True)

    runners: dict[str, Runner] = {}
    setup_s: dict[str, float] = {}
    for name, make in configs.items():
        start = time.perf_counter()
        runners[name] = make()
        setup_s[name] = time.perf_counter() - start
        log(f"{name}: ready in {setup_s[name]:.1f} s")
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in batches}
    for name, run in runners.items():  # warm every shape first: algorithm searches stay out of the timings
        for b in batches:
            start = time.perf_counter()
            out = run(inputs[b])
            log(f"{name} batch {b}: first call {time.perf_counter() - start:.2f} s")
            assert out is not None
    measured: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            for b in batches:
                measured[name][b].append(time_runner(run, inputs[b], args.seconds))
                log(f"round {r + 1} {name} batch {b}: {measured[name][b][-1]:.0f} images/s")
    table = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in measured.items()}
    gpu = "unknown GPU"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0)
    except Exception:  # the name is only a label
        pass
    result = {
        "gpu": gpu,
        "python": platform.python_version(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "images_per_s": {name: {str(b): round(v, 1) for b, v in per.items()} for name, per in table.items()},
        "setup_s": {name: round(v, 1) for name, v in setup_s.items()},
        "skipped": skipped,
    }
    ref = "pytorch eager fp32"
    if ref in table:
        result["over_pytorch_fp32"] = {
            name: {str(b): round(per[b] / table[ref][b], 2) for b in batches} for name, per in table.items()
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{gpu}; onnxruntime {result['onnxruntime']}; images/s, median of {args.rounds} rounds")
    print(f"{'engine':28}" + "".join(f"{'batch ' + str(b):>12}" for b in batches) + f"{'setup s':>10}")
    for name, per in table.items():
        print(f"{name:28}" + "".join(f"{per[b]:>12.0f}" for b in batches) + f"{setup_s[name]:>10.1f}")
    for name, why in skipped.items():
        print(f"{name:28} not measured: {why}")
    if "over_pytorch_fp32" in result:
        print(f"\nover {ref}:")
        for name, per in result["over_pytorch_fp32"].items():  # type: ignore[attr-defined]
            print(f"{name:28}" + "".join(f"{per[str(b)]:>12.2f}" for b in batches))


if __name__ == "__main__":
    main()

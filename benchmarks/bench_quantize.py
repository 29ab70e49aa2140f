"""INT8 vs FP32 with ONNX Runtime on this CPU, EfficientNet-Lite0, measured side by side in one run:

1. accuracy: top-1 on ../shared/data/imagenet-sample (100 photos, one per class) for FP32 and INT8,
   and their top-1 agreement; INT8 is calibrated on ../shared/data/hymenoptera (other photos than
   the ones it is scored on), through `models.quantize` exactly as `backbones export --quantize`;
2. throughput (images/s of ONNX Runtime alone, preprocessed photos in memory) at 1 and 2 threads,
   batch 1 and 8: the exported FP32 graph, the same graph without shape folding (what export wrote
   before models/graph_prep.py), and INT8. The variants alternate round by round so that a
   neighbour's load hits all of them alike; the median round counts.

Targets (issue 7): INT8/FP32 >= 1.8x, INT8 top-1 within 1.5 points of FP32.
Usage: uv run python benchmarks/bench_quantize.py [--rounds 7] [--seconds 1.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import class_index, cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = ((1, 1), (1, 8), (2, 1), (2, 8))  # (threads, batch)


def rate(session, batch: np.ndarray, seconds: float) -> float:  # type: ignore[no-untyped-def]
    session.run(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per configuration")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per variant and round")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    sample, calib = DATA / "imagenet-sample", DATA / "hymenoptera" / "train"
    if not sample.is_dir() or not calib.is_dir():
        raise SystemExit("the benchmark needs ../shared/data/imagenet-sample and ../shared/data/hymenoptera")
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    from models import Registry
    from models.export import export_catalog, export_onnx
    from models.preprocess import ImageLoader
    from models.quantize import QuantizeOptions, quantize_version
    from models.runtime import OnnxSession
    from models.settings import Settings
    from models.spec import ONNX_FILENAME
    from models.weights import build_pretrained

    home = Path(tempfile.mkdtemp(prefix="bench-quantize-")) / "bentoml"
    reg = Registry(home)
    fp32 = export_catalog("efficientnet_lite0", registry=reg)
    photos = sorted(p for p in calib.rglob("*") if p.is_file())
    t = time.perf_counter()
    # 49 held-out photos cannot show 98 % unless all agree (docs/benchmarks.md): the gate is set at 95 %
    int8 = quantize_version(fp32, photos, registry=reg, name="lite0_int8", options=QuantizeOptions(min_agreement=0.95))
    quantize_s = time.perf_counter() - t
    log(f"quantized in {quantize_s:.1f} s: {int8.tag}")
    unfolded = home.parent / "unfolded.onnx"
    from models import get_entry

    export_onnx(build_pretrained(get_entry("efficientnet_lite0")), unfolded, fp32.spec.preprocess.crop, fold=False)

    # accuracy on photos the calibrator never saw
    wnids = class_index(DATA)
    scored = sorted(p for p in sample.iterdir() if p.is_file())
    truth = np.array([wnids[p.name.split("_", 1)[0]] for p in scored])
    batch_all = ImageLoader(fp32.spec.preprocess).batch(scored)
    cpu = Settings(providers="cpu")
    variants = {
        "fp32": fp32.file(ONNX_FILENAME),
        "fp32_unfolded": unfolded,
        "int8": int8.file(ONNX_FILENAME),
    }
    preds = {k: OnnxSession(v, settings=cpu).run(batch_all).logits.argmax(1) for k, v in variants.items()}
    top1 = {k: float((v == truth).mean()) for k, v in preds.items()}
    agreement = float((preds["int8"] == preds["fp32"]).mean())
    log(f"top-1 on {len(scored)} ImageNet photos: {top1}; INT8/FP32 agreement {agreement:.2f}")

    speed: dict[str, dict[str, float]] = {}
    for threads, bsz in CONFIGS:
        sessions = {k: OnnxSession(v, settings=cpu, threads=threads) for k, v in variants.items()}
        batch = batch_all[:bsz]
        rounds: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                rounds[k].append(rate(s, batch, args.seconds))
        key = f"threads={threads} batch={bsz}"
        speed[key] = {k: statistics.median(v) for k, v in rounds.items()}
        log(key, {k: round(v, 1) for k, v in speed[key].items()})

    ratios = {
        k: {
            "int8_over_fp32": round(v["int8"] / v["fp32"], 2),
            "fp32_over_unfolded": round(v["fp32"] / v["fp32_unfolded"], 2),
        }
        for k, v in speed.items()
    }
    held = int8.spec.conversion["heldout"] if int8.spec.conversion else {}
    result = {
        "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "model": "efficientnet_lite0",
        "calibration": {
            "photos": "hymenoptera/train",
            "calibration_images": int8.spec.conversion["calibration"]["calibration_images"]
            if int8.spec.conversion
            else None,
            "heldout_images": held.get("images"),
            "heldout_top1_agreement": held.get("top1_agreement"),
            "heldout_max_abs_logit_diff": held.get("max_abs_logit_diff"),
            "seconds": round(quantize_s, 1),
        },
        "imagenet_sample_top1": top1,
        "imagenet_sample_int8_fp32_agreement": agreement,
        "images_per_s": {k: {n: round(x, 1) for n, x in v.items()} for k, v in speed.items()},
        "ratios": ratios,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(
        f"INT8 calibrated on {result['calibration']['calibration_images']} hymenoptera photos in "
        f"{quantize_s:.1f} s; held-out agreement with FP32 {held.get('top1_agreement', 0):.3f} on "
        f"{held.get('images')} photos, max |dlogit| {held.get('max_abs_logit_diff', 0):.2f}"
    )
    print(
        f"top-1 on {len(scored)} imagenet-sample photos: FP32 {top1['fp32']:.2f}, INT8 {top1['int8']:.2f} "
        f"(difference {100 * (top1['int8'] - top1['fp32']):+.1f} points; target within 1.5), agreement {agreement:.2f}"
    )
    print(f"\n{'config':20} {'fp32 unfolded':>14} {'fp32':>8} {'int8':>8} {'int8/fp32':>10} {'fold gain':>10}")
    for k, v in speed.items():
        r = ratios[k]
        print(
            f"{k:20} {v['fp32_unfolded']:>14.1f} {v['fp32']:>8.1f} {v['int8']:>8.1f} "
            f"{r['int8_over_fp32']:>9.2f}x {r['fp32_over_unfolded']:>9.2f}x"
        )
    print("(images/s of ONNX Runtime alone; target INT8/FP32 >= 1.8x)")


if __name__ == "__main__":
    main()

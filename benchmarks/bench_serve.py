"""Serving throughput, measured side by side in one run on ../shared/data/imagenet-sample:

1. the in-process ceiling: decode + preprocess + ONNX Runtime on both cores, no HTTP, the best of
   a few configurations: decode threads feeding batched calls on all cores, and one worker per core
   that decodes and runs batch-1 calls on one thread (ONNX Runtime sessions take concurrent calls);
2. `backbones serve` (BentoML) over HTTP at 1, 16 and 64 clients: images/s, p50/p99, non-2xx;
3. a straightforward FastAPI + PyTorch eager server (benchmarks/baseline_fastapi_torch.py), same
   model and photos, same client counts;
4. the first served version over the Open Inference Protocol (KServe v2, benchmarks/oip_load.py:
   binary tensor data, top-5 classification) in each round right after the /classify loads: one
   photo per request at 64 clients, and 8 photos per request at 8 clients (the same photos in
   flight). --no-v2 leaves it out.

The server runs in --rounds rounds (default 3): each re-measures the best ceiling arrangement while
the server idles, then the HTTP load; the HTTP/ceiling ratio is the median of the rounds' ratios
(this VM's speed drifts within minutes, so each ratio compares runs minutes apart at most).

Targets (issue #3): HTTP >= 0.85 x ceiling at its best concurrency, zero non-2xx at 64 clients,
>= 3 x the baseline. v2: >= 0.9 x /classify's images/s at 64 clients, and 8 photos per request at
least as many images/s as one.
Usage: uv run python benchmarks/bench_serve.py [--seconds 20] [--rounds 3] [--json] [--no-v2]
[--quantized: the INT8 version of the model too, side by side | --model REF: a version you registered]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadResult, multipart_request, run_load
from oip_load import V2Rounds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
CLIENTS = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ceiling(onnx_path: Path, pre, photos: list[bytes], decode_threads: int, batch: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Decode threads run ahead of one batched ONNX Runtime call at a time on every core."""
    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession

    session = OnnxSession(onnx_path, threads=os.cpu_count())
    loader = ImageLoader(pre)
    source = itertools.cycle(photos)
    with ThreadPoolExecutor(decode_threads) as pool:
        pending = deque(pool.submit(loader, next(source)) for _ in range(2 * batch))
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            arrays = [pending.popleft().result() for _ in range(batch)]
            pending.extend(pool.submit(loader, next(source)) for _ in range(batch))
            session.run(np.stack(arrays))
            done += batch
        elapsed = time.perf_counter() - start
        for f in pending:
            f.cancel()
    return done / elapsed


def ceiling_workers(onnx_path: Path, pre, photos: list[bytes], workers: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """``workers`` threads each decode one photo and run it (batch 1) on a shared one-thread session."""
    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession

    session = OnnxSession(onnx_path, threads=1)
    loader = ImageLoader(pre)
    stop = time.perf_counter() + seconds
    counts = [0] * workers

    def work(i: int) -> None:
        for photo in itertools.islice(itertools.cycle(photos), i * 7, None):
            if time.perf_counter() >= stop:
                return
            session.run(loader(photo)[None])
            counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(workers)))
    return sum(counts) / (time.perf_counter() - start)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


def measure_server(
    args: list[str],
    env: dict[str, str],
    photos: list[bytes],
    seconds: float,
    *,
    rounds: int = 1,
    between: Callable[[], float] | None = None,
    also: Callable[[int, list[LoadResult]], None] | None = None,
) -> list[tuple[float | None, list[LoadResult]]]:
    """Start the server once; each round runs ``between`` (the in-process ceiling, while the
    server idles) and then the load at every client count, then ``also(port, loads)``. Returns
    (ceiling, loads) per round."""
    port = free_port()
    proc = subprocess.Popen(
        [*args, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        requests = [multipart_request("127.0.0.1", "/classify", p) for p in photos]
        run_load("127.0.0.1", port, requests, 4, 3.0)  # warm-up
        out: list[tuple[float | None, list[LoadResult]]] = []
        for _ in range(rounds):
            ceiling_rate = between() if between is not None else None
            out.append((ceiling_rate, [run_load("127.0.0.1", port, requests, c, seconds) for c in CLIENTS]))
            if also is not None:
                also(port, out[-1][1])
        return out
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def row(name: str, r: LoadResult) -> dict[str, object]:
    return {
        "server": name,
        "clients": r.clients,
        "images_per_s": round(r.rps, 1),
        "p50_ms": round(r.percentile(50), 1),
        "p99_ms": round(r.percentile(99), 1),
        "non_2xx": r.non_2xx,
        "requests": r.ok + r.non_2xx,
    }


def served_versions(args: argparse.Namespace, log) -> tuple[Path, list[tuple[str, str, object]]]:  # type: ignore[no-untyped-def]
    """The registry home and the (label, ref, stored version) to serve, one after the other."""
    from models import Registry
    from models.export import export_catalog

    if args.model:
        reg = Registry()
        stored = reg.get(args.model)
        return reg.home, [(f"{stored.tag} ({stored.spec.precision})", args.model, stored)]
    home = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "bentoml"
    reg = Registry(home)
    stored = export_catalog("efficientnet_lite0", registry=reg)
    served: list[tuple[str, str, object]] = [("fp32", "efficientnet_lite0", stored)]
    if args.quantized:
        from models.quantize import QuantizeOptions, quantize_version

        calib = args.data.parent / "hymenoptera" / "train"
        if not calib.is_dir():
            raise SystemExit(f"--quantized calibrates on {calib}, which is absent")
        photos = sorted(p for p in calib.rglob("*") if p.is_file())
        # 49 held-out photos cannot show 98 % unless all 49 agree: the gate is set at 95 % here
        q = quantize_version(
            stored, photos, registry=reg, name="efficientnet_lite0_int8", options=QuantizeOptions(min_agreement=0.95)
        )
        log(f"quantized: {q.tag}")
        served.append(("int8", "efficientnet_lite0_int8", q))
    return home, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of photos (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FastAPI + PyTorch server")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (ceiling, HTTP at every client count) on one server; the median ratio counts",
    )
    parser.add_argument(
        "--model",
        metavar="REF",
        help="serve this registered version from $BENTOML_HOME (an INT8 one, say) instead of a fresh "
        "efficientnet_lite0 export in a temporary registry",
    )
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="also make the INT8 version of efficientnet_lite0 (calibrated on ../shared/data/hymenoptera) "
        "and serve it after the FP32 one, in the same run",
    )
    parser.add_argument(
        "--no-v2", action="store_true", help="skip the Open Inference Protocol (KServe v2) client variants"
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    if args.model and args.quantized:
        parser.error("--quantized makes its own INT8 version; to serve one you made, give it with --model alone")
    if not args.data.is_dir():
        raise SystemExit(f"no photos at {args.data} (the benchmark needs ../shared/data/imagenet-sample)")
    photos = [
        p.read_bytes() for p in sorted(args.data.iterdir()) if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg")
    ]
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    home, served = served_versions(args, log)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    cores = os.cpu_count() or 1

    ceilings: dict[str, dict[str, float]] = {}
    rows: list[dict[str, object]] = []
    best: dict[str, float] = {}  # median over rounds of the best client count's images/s
    ratio_median: dict[str, float] = {}
    round_ratios: dict[str, list[dict[str, float]]] = {}
    non_2xx_64: dict[str, int] = {}
    v2 = None if args.no_v2 else V2Rounds(served[0][0], served[0][1], photos, args.seconds)  # the first version
    for label, ref, stored in served:
        onnx_path, pre = stored.file("model.onnx"), stored.spec.preprocess  # type: ignore[attr-defined]
        mine = ceilings[label] = {}
        for threads, batch in [(cores, 16), (cores, 8)]:
            mine[f"decode_threads={threads} batch={batch} ort_threads={cores}"] = ceiling(
                onnx_path, pre, photos, threads, batch, args.seconds / 2
            )
            log(label, *list(mine.items())[-1])
        for workers in (cores, cores + 1):
            mine[f"workers={workers} batch=1 ort_threads=1"] = ceiling_workers(
                onnx_path, pre, photos, workers, args.seconds / 2
            )
            log(label, *list(mine.items())[-1])
        # every round pairs the best arrangement's ceiling with the HTTP runs right after it: this
        # VM's speed drifts by ±15 % within minutes, so each ratio compares like with like
        top = max(mine, key=mine.__getitem__)
        workers_top = int(top.split("=")[1].split()[0]) if top.startswith("workers=") else None

        paired_ceiling: Callable[[], float] = (
            functools.partial(ceiling_workers, onnx_path, pre, photos, workers_top, args.seconds / 2)
            if workers_top is not None
            else functools.partial(max, mine.values())  # a batched arrangement won: not re-measured
        )

        measured = measure_server(
            [sys.executable, "-m", "cli", "serve", "--model", ref, "--host", "127.0.0.1"],
            env,
            photos,
            args.seconds,
            rounds=args.rounds,
            between=paired_ceiling,
            also=v2 if v2 is not None and label == v2.label else None,
        )
        ratios = []
        for i, (ceil, ours) in enumerate(measured, 1):
            for r in ours:
                rows.append({**row(f"backbones serve {label}", r), "round": i})
                log(rows[-1])
            ratios.append(max(r.rps for r in ours) / (ceil or max(mine.values())))
            round_ratios.setdefault(label, []).append(
                {"round": i, "ceiling": round(ceil or 0.0, 1), "http_best": round(max(r.rps for r in ours), 1)}
            )
            log(label, "round", i, "ceiling", ceil, "ratio", round(ratios[-1], 3))
        ratio_median[label] = statistics.median(ratios)
        best[label] = statistics.median(max(r.rps for r in ours) for _, ours in measured)
        non_2xx_64[label] = sum(next(r.non_2xx for r in ours if r.clients == 64) for _, ours in measured)
    base: list[LoadResult] = []
    if not args.no_baseline:
        ((_, base),) = measure_server(
            [sys.executable, "benchmarks/baseline_fastapi_torch.py"], env, photos, args.seconds
        )
        rows += [row("FastAPI + PyTorch eager", r) for r in base]
    rows += v2.rows if v2 is not None else []
    first = served[0][0]
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "photos": len(photos),
        "ceiling_images_per_s": {lab: {k: round(v, 1) for k, v in c.items()} for lab, c in ceilings.items()},
        "rows": rows,
        "http_over_ceiling": {lab: round(v, 3) for lab, v in ratio_median.items()},
        "rounds": round_ratios,
        "non_2xx_at_64": non_2xx_64,
        "over_baseline": round(best[first] / max(r.rps for r in base), 2) if base else None,
        "int8_over_fp32_http": round(best["int8"] / best["fp32"], 2) if "int8" in best else None,
        "v2": v2.summary() if v2 is not None else None,
    }
    if args.json:
        print(json.dumps(result))
        return
    for lab, c in ceilings.items():
        print(f"[{lab}] in-process ceiling (decode + ONNX Runtime, no HTTP): {max(c.values()):.1f} images/s")
        for k, v in c.items():
            print(f"  {k:42} {v:7.1f} images/s")
    print(f"\n{'server':30} {'round':>5} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for rw in rows:
        print(
            f"{rw['server']:30} {rw.get('round', ''):>5} {rw['clients']:>7} {rw['images_per_s']:>9} "
            f"{rw['p50_ms']:>8} {rw['p99_ms']:>8} {rw['non_2xx']:>8}"
        )
    for lab, ratio in result["http_over_ceiling"].items():  # type: ignore[attr-defined]
        per_round = ", ".join(f"{x['http_best']}/{x['ceiling']}" for x in round_ratios[lab])
        print(f"\n[{lab}] rounds (HTTP best / paired ceiling, images/s): {per_round}")
        print(f"[{lab}] HTTP best / in-process ceiling, median of rounds: {ratio:.2f} (target >= 0.85)")
        print(f"[{lab}] non-2xx at 64 clients: {non_2xx_64[lab]} (target 0)")
    if base:
        print(f"backbones best ({first}) / FastAPI + PyTorch best: {result['over_baseline']:.2f}x (target >= 3)")
    if result["int8_over_fp32_http"]:
        print(f"HTTP best INT8 / FP32: {result['int8_over_fp32_http']:.2f}x")
    if v2 is not None:
        summary = v2.summary()
        print(
            f"[{v2.label}] v2 / /classify at 64 clients, images/s, median of rounds: "
            f"{summary['v2_over_classify_at_64']:.2f} (target >= 0.9)"
        )
        print(
            f"[{v2.label}] v2 8 photos per request / 1 per request, images/s: {summary['v2_x8_over_v2_x1']:.2f} "
            f"(target >= 1); v2 non-2xx: {summary['non_2xx']} (target 0)"
        )


if __name__ == "__main__":
    main()

"""Serving throughput and latency, side by side in one run on ../shared/data/imagenet-sample:

1. the in-process ceiling (decode + preprocess + ONNX Runtime on every core, no HTTP; the best of
   a few arrangements, serve_ceiling.py) and the time one photo takes alone;
2. at 1, 4, 16 and 64 keep-alive clients: `backbones serve`, NVIDIA Triton (PyTriton's bundled
   server with the same ONNX graph and our preprocessing in its Python model, dynamic batching,
   one instance per core: baseline_triton.py) and a FastAPI + PyTorch eager server;
3. the Open Inference Protocol client on `backbones serve` (one photo per request, and 8).

Every round re-measures the ceiling, then each server in turn (the order alternates between
rounds) while the others are paused (SIGSTOP), so no server competes with another for the two
cores. Every round is reported, not only the best.

Targets: at 16 and 64 clients >= 0.85 x the round's ceiling in every round and >= 1.3 x Triton's
images/s; p50 at 16 clients <= Triton's; p50 at 1 client <= 1.3 x one photo alone; no non-2xx.
Phases after the first (--phases): `several` (a second model served beside the first, the load on
the first), `swap` (right after a hot swap of the served alias), `int8` (the INT8 version of the
model): `backbones serve` once each against a fresh ceiling.

Usage: uv run python benchmarks/bench_serve.py [--seconds 15] [--rounds 3] [--phases one,several,swap]
[--model REF] [--no-triton] [--no-baseline] [--no-v2] [--json]   (Triton: `make bench` installs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_ceiling
import serve_servers
from loadgen import LoadResult, run_load, with_header
from oip_load import V2Rounds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
CLIENTS = (1, 4, 16, 64)
PHASES = ("one", "several", "swap", "int8")


@dataclass
class Round:
    phase: str
    index: int
    ceiling: float
    loads: dict[str, list[LoadResult]] = field(default_factory=dict)  # server name -> one per client count

    def at(self, server: str, clients: int) -> LoadResult | None:
        return next((r for r in self.loads.get(server, []) if r.clients == clients), None)


def load_all(server: serve_servers.ServerProcess, photos: list[bytes], seconds: float) -> list[LoadResult]:
    requests = [server.request(p) for p in photos]
    run_load(serve_servers.HOST, server.port, requests, 4, 2.0)  # warm-up: connections, caches
    return [run_load(serve_servers.HOST, server.port, requests, c, seconds) for c in CLIENTS]


def measure_rounds(
    phase: str,
    servers: list[serve_servers.ServerProcess],
    version: Any,
    best: str,
    photos: list[bytes],
    args: argparse.Namespace,
    log: Any,
    also: Any = None,
) -> list[Round]:
    """``args.rounds`` rounds (one for phases after the first): the ceiling with every server
    paused, then each server alone, in an order that alternates between rounds."""
    rounds = []
    onnx_path, pre = version.file("model.onnx"), version.spec.preprocess
    for i in range(1, (args.rounds if phase == "one" else 1) + 1):
        for s in servers:
            s.pause()
        rnd = Round(phase, i, serve_ceiling.remeasure(best, onnx_path, pre, photos, args.seconds / 2))
        log(f"[{phase}] round {i}: ceiling {rnd.ceiling:.1f} images/s")
        for s in servers if i % 2 else servers[::-1]:
            s.resume()
            rnd.loads[s.name] = load_all(s, photos, args.seconds)
            if also is not None and s is servers[0]:
                also(s.port, rnd.loads[s.name])
            s.pause()
            log(f"[{phase}] round {i}: {s.name}: " + ", ".join(f"{r.clients}c {r.rps:.1f}" for r in rnd.loads[s.name]))
        rounds.append(rnd)
    return rounds


def registry_versions(args: argparse.Namespace, log: Any) -> tuple[Path, dict[str, Any]]:
    """A registry with what the phases serve: the model (and a second version of it for `swap`),
    a second model for `several`, the INT8 version for `int8`."""
    from models import Registry
    from models.export import export_catalog

    if args.model:
        reg = Registry()
        return reg.home, {"main": reg.get(args.model)}
    home = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "bentoml"
    reg = Registry(home)
    out = {"main": export_catalog("efficientnet_lite0", registry=reg)}
    reg.set_alias(out["main"].tag, "production")
    if "several" in args.phases:
        out["second"] = export_catalog("efficientnet_lite1", registry=reg)
    if "swap" in args.phases:
        out["next"] = export_catalog("efficientnet_lite0", registry=reg)
    if "int8" in args.phases:
        from models.quantize import QuantizeOptions, quantize_version

        calib = args.data.parent / "hymenoptera" / "train"
        photos = sorted(p for p in calib.rglob("*") if p.is_file())
        # 49 held-out photos cannot show 98 % unless all 49 agree: the gate is set at 95 % here
        out["int8"] = quantize_version(
            out["main"], photos, registry=reg, name="lite0_int8", options=QuantizeOptions(min_agreement=0.95)
        )
    log("registered: " + ", ".join(v.tag for v in out.values()))
    return home, out


def swap_alias(server: serve_servers.ServerProcess, home: Path, target: Any, timeout: float = 120) -> float:
    """Move `production` to ``target`` and wait until the server answers with it; seconds taken."""
    import httpx

    from models import Registry

    start = time.monotonic()
    Registry(home).set_alias(target.tag, "production")
    while time.monotonic() - start < timeout:
        served = httpx.get(f"http://{serve_servers.HOST}:{server.port}/models", timeout=5).json()
        if any(m.get("version") == target.spec.version for m in served.get("models", [])):
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"the server did not swap to {target.tag} within {timeout} s")


def run_phase(phase: str, versions: dict[str, Any], env: dict[str, str], best: str, photos, args, log) -> list[Round]:  # type: ignore[no-untyped-def]
    main = versions["main"]
    refs = {
        "several": [f"{main.spec.name}@production", versions.get("second", main).spec.name],
        "int8": [versions.get("int8", main).tag],
    }.get(phase, [f"{main.spec.name}@production"])
    ours = serve_servers.backbones(refs, env)
    ours.launch(Path(tempfile.gettempdir()) / f"bench-serve-{phase}.log")
    try:
        if phase == "swap":
            log(
                f"[swap] swapped to {versions['next'].tag} in {swap_alias(ours, env_home(env), versions['next']):.1f} s"
            )
        version = versions["int8"] if phase == "int8" else main
        return measure_rounds(phase, [ours], version, best, photos, args, log)
    finally:
        ours.stop()


def env_home(env: dict[str, str]) -> Path:
    return Path(env["BENTOML_HOME"])


def main() -> None:
    args = parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no photos at {args.data} (the benchmark needs ../shared/data/imagenet-sample)")
    photos = [p.read_bytes() for p in sorted(args.data.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg")]
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    home, versions = registry_versions(args, log)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    main_version = versions["main"]
    onnx_path, pre = main_version.file("model.onnx"), main_version.spec.preprocess
    arrangements = serve_ceiling.arrangements(onnx_path, pre, photos, args.seconds / 2)
    best = max(arrangements, key=arrangements.__getitem__)
    alone_ms = serve_ceiling.single_photo_ms(onnx_path, pre, photos)
    log(f"ceiling arrangements: {arrangements}; one photo alone: {alone_ms:.1f} ms")

    ours = serve_servers.backbones([f"{main_version.spec.name}@production"], env)
    if args.api_key:  # authentication on: the server requires the key, every request carries it
        ours.env = {**env, "BACKBONES_API_KEYS": args.api_key}
        plain = ours.request
        ours.request = lambda photo: with_header(plain(photo), "Authorization", f"Bearer {args.api_key}")
    servers = [ours]
    if not args.no_triton:
        servers.append(
            serve_servers.triton(
                main_version.path,
                env,
                Path(tempfile.gettempdir()) / "bench-triton.log",
                instances=args.triton_instances,
            )
        )
    if not args.no_baseline and not args.model:
        servers.append(serve_servers.fastapi_torch(env))
    v2 = None if args.no_v2 else V2Rounds("fp32", f"{main_version.spec.name}@production", photos, args.seconds)
    if v2 is not None and args.api_key:
        bearer = f"Bearer {args.api_key}"
        v2.single = [with_header(r, "Authorization", bearer) for r in v2.single]
        v2.batched = [with_header(r, "Authorization", bearer) for r in v2.batched]
    rounds: list[Round] = []
    try:
        for s in servers:
            s.launch(Path(tempfile.gettempdir()) / f"bench-serve-{s.port}.log")
            s.pause()
        rounds += measure_rounds("one", servers, main_version, best, photos, args, log, also=v2)
    finally:
        for s in servers:
            s.stop()
    for phase in args.phases[1:]:
        rounds += run_phase(phase, versions, env, best, photos, args, log)
    report(rounds, servers[0].name, arrangements, alone_ms, v2, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of photos (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the first phase (later phases: one)")
    parser.add_argument(
        "--phases",
        default="one",
        type=lambda v: [p for p in v.split(",") if p],
        help=f"comma-separated, starting with one: {', '.join(PHASES)} (default: %(default)s)",
    )
    parser.add_argument("--model", metavar="REF", help="serve this registered version from $BENTOML_HOME instead")
    parser.add_argument("--triton-instances", type=int, default=os.cpu_count() or 1, help="Triton model instances")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="serve with authentication on (BACKBONES_API_KEYS=KEY, 16 characters at least) and send the key",
    )
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton baseline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FastAPI + PyTorch server")
    parser.add_argument("--no-v2", action="store_true", help="skip the Open Inference Protocol client variants")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    if not args.phases or args.phases[0] != "one" or not set(args.phases) <= set(PHASES):
        parser.error(f"--phases starts with one and takes {', '.join(PHASES)}")
    if args.model and len(args.phases) > 1:
        parser.error("--model serves one version: the later phases make their own versions")
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    return args


def judge(rnd: Round, ours: str, triton: str | None, alone_ms: float) -> dict[str, bool | None]:
    """The targets, for one round."""
    out: dict[str, bool | None] = {}
    for c in (16, 64):
        mine = rnd.at(ours, c)
        theirs = rnd.at(triton, c) if triton else None
        out[f"ceiling_{c}"] = mine is not None and mine.rps >= 0.85 * rnd.ceiling
        out[f"triton_{c}"] = None if theirs is None or mine is None else mine.rps >= 1.3 * theirs.rps
    mine16, theirs16 = rnd.at(ours, 16), rnd.at(triton, 16) if triton else None
    out["p50_16"] = None if not (mine16 and theirs16) else mine16.percentile(50) <= theirs16.percentile(50)
    lone = rnd.at(ours, 1)
    out["p50_1"] = lone is not None and lone.percentile(50) <= 1.3 * alone_ms
    out["no_errors"] = all(r.non_2xx == 0 for r in rnd.loads.get(ours, []))
    return out


def report(rounds: list[Round], ours: str, arrangements: dict[str, float], alone_ms: float, v2, args) -> None:  # type: ignore[no-untyped-def]
    triton = next((n for n in rounds[0].loads if n.startswith("Triton")), None)
    rows = [
        {
            "phase": r.phase,
            "round": r.index,
            "server": name,
            "clients": x.clients,
            "images_per_s": round(x.rps, 1),
            "of_ceiling": round(x.rps / r.ceiling, 3),
            "p50_ms": round(x.percentile(50), 1),
            "p99_ms": round(x.percentile(99), 1),
            "non_2xx": x.non_2xx,
        }
        for r in rounds
        for name, loads in r.loads.items()
        for x in loads
    ]
    verdicts = [
        {"phase": r.phase, "round": r.index, "ceiling": round(r.ceiling, 1), **judge(r, ours, triton, alone_ms)}
        for r in rounds
    ]
    result = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "ceiling_arrangements": {k: round(v, 1) for k, v in arrangements.items()},
        "one_photo_alone_ms": round(alone_ms, 2),
        "rows": rows,
        "targets_by_round": verdicts,
        "v2": v2.summary() if v2 is not None else None,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"in-process ceiling arrangements (images/s): {result['ceiling_arrangements']}")
    print(f"one photo alone (decode + preprocess + inference): {alone_ms:.1f} ms")
    head = f"{'phase':8} {'rnd':>3} {'server':34} {'clients':>7} {'images/s':>9} {'/ceil':>6} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7}"
    print("\n" + head)
    for w in rows:
        print(
            f"{w['phase']:8} {w['round']:>3} {w['server']:34} {w['clients']:>7} {w['images_per_s']:>9} "
            f"{w['of_ceiling']:>6} {w['p50_ms']:>8} {w['p99_ms']:>8} {w['non_2xx']:>7}"
        )
    print(
        "\ntargets per round (ceiling: >= 0.85 of it; triton: >= 1.3x its images/s; p50_16: <= Triton's; "
        "p50_1: <= 1.3x one photo alone)"
    )
    for v in verdicts:
        marks = " ".join(
            f"{k}={'ok' if ok else ('-' if ok is None else 'MISSED')}"
            for k, ok in v.items()
            if k not in ("phase", "round", "ceiling")
        )
        print(f"  {v['phase']:8} round {v['round']}: ceiling {v['ceiling']:6.1f}  {marks}")
    if v2 is not None:
        s = v2.summary()
        print(
            f"v2 / /classify at 64 clients: {s['v2_over_classify_at_64']:.2f} (target >= 0.9); "
            f"v2 8 photos per request / 1: {s['v2_x8_over_v2_x1']:.2f} (target >= 1); v2 non-2xx: {s['non_2xx']}"
        )


if __name__ == "__main__":
    main()

"""Batch embedding throughput, measured side by side in one run.

1. The in-process ceiling: decode + preprocess + ONNX Runtime in one process using every core,
   nothing written (the best of a few simple configurations: decoding serially or in threads
   ahead of inference, ONNX Runtime as one call on one thread or all cores, or as micro-batches
   run on one thread per core at once).
2. The local engine (``backbones embed``: decode worker processes, ORT in the main process,
   Parquet shards), with its default workers and threads.
3. The Ray engine on this one machine (a local Ray with every core).
4. Both engines again from object storage to object storage: the same photos as objects, the
   manifest listing their ``s3://`` URLs, the shards written as objects, on moto's S3 server
   started by this script on a local port (a process of its own; it shares the cores with the
   job, which a real store would not). Printed with the ratio of each to its disk-to-disk rate.

Each engine's rate counts from its first image to its last shard written; start-up (decode
workers, sessions, Ray actors) is reported apart. Each round measures the ceiling and both
engines one after the other; an engine's ratio is taken against the ceiling of its own round and
the medians over rounds are printed. The photos of ``imagenet-sample`` are repeated ``--repeat``
times. This machine may be shared: the share of the cores the benchmark got is printed too.

    uv run python benchmarks/bench_embed.py [--data DIR] [--repeat 10] [--rounds 2] [--no-s3] [--json]

Model: efficientnet_lite0 (bundled weights), exported into a temporary BENTOML_HOME (or
``--registry DIR`` to reuse one). Heavy imports stay inside functions: the decode workers are
spawned processes that import this module again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.s3server: the S3 server the tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import cpu_model  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
SAMPLE_DIR = "imagenet-sample"
MODEL = "efficientnet_lite0"
SHARD_SIZE = 100  # ten shards per 1000 images: several actors (Ray) or shard writes (local) in play
S3_SUFFIX = " s3->s3"  # the engines' rows from object storage to object storage


class CpuShare:
    """The share of the machine's cores that this process and its finished children used since
    this was made. Below ~0.9 for a part that should fill every core, other processes (this is a
    shared machine) took the rest. Not meaningful for Ray, whose workers are not our children."""

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        import resource

        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def share(self) -> float:
        end = self._read()
        return (end[1] - self._start[1]) / ((end[0] - self._start[0]) * self.cores)


# -- 1. the in-process ceiling -------------------------------------------------------------------


def _run_ceiling(paths: Sequence[str], loader: Any, session: Any, batch: int, decode_threads: int) -> float:
    """images/s of decode + inference in this process; ``decode_threads`` 0 = serially."""
    import numpy as np

    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]

    def decode(chunk: Sequence[str]) -> Any:
        return np.stack([loader(p) for p in chunk])

    start = time.perf_counter()
    if decode_threads == 0:
        for chunk in chunks:
            session.run(decode(chunk))
    else:
        # Pillow's decoder and resampler and NumPy release the GIL: threads decode ahead
        with ThreadPoolExecutor(decode_threads) as pool:
            pending = [pool.submit(decode, c) for c in chunks[: 2 * decode_threads]]
            nxt = len(pending)
            while pending:
                x = pending.pop(0).result()
                if nxt < len(chunks):
                    pending.append(pool.submit(decode, chunks[nxt]))
                    nxt += 1
                session.run(x)
    return len(paths) / (time.perf_counter() - start)


def core_time_model(paths: Sequence[str], model_file: Path, loader: Any, batch: int, cores: int) -> dict[str, float]:
    """Decode ms/image on one core plus ORT ms/image on one thread: what ``cores`` cores could do
    if nothing were lost to sharing them."""
    import numpy as np

    from models import OnnxSession, Settings

    sample = paths[: min(200, len(paths))]
    t0 = time.perf_counter()
    x = np.stack([loader(p) for p in sample[:batch]])
    for p in sample[batch:]:
        loader(p)
    decode_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    session = OnnxSession(model_file, settings=Settings(providers="cpu"), threads=1)
    t0 = time.perf_counter()
    for _ in range(4):
        session.run(x)
    infer_ms = (time.perf_counter() - t0) / (4 * len(x)) * 1e3
    return {"decode_ms": decode_ms, "infer_core_ms": infer_ms, "images_per_s": cores * 1e3 / (decode_ms + infer_ms)}


def ceiling_configs(cores: int) -> list[tuple[int, int, int]]:
    """(ORT threads per call, decode threads (0 = decode serially before each inference), ORT calls
    at once (>1: the batch split into micro-batches run on that many threads))."""
    if cores == 1:
        return [(1, 0, 1), (1, 1, 1)]
    return [(cores, 0, 1), (cores, 1, 1), (cores, cores, 1), (1, cores, 1), (1, cores, cores), (1, 1, cores)]


def bench_ceiling(paths: Sequence[str], model_file: Path, loader: Any, batch: int, cores: int) -> dict[str, float]:
    from models import OnnxSession, Settings
    from models.runtime import MICRO_BATCH, ConcurrentRunner

    rates = {}
    sessions: dict[int, Any] = {}
    for threads, decode_threads, runners in ceiling_configs(cores):
        if threads not in sessions:
            sessions[threads] = OnnxSession(model_file, settings=Settings(providers="cpu"), threads=threads)
        session = sessions[threads]
        how = "serial decode" if decode_threads == 0 else f"{decode_threads} decode thread(s) ahead"
        if runners == 1:
            rates[f"{how}, ORT {threads} thread(s)"] = _run_ceiling(paths, loader, session, batch, decode_threads)
            continue
        label = f"{how}, {runners} ORT calls at once of {MICRO_BATCH} images, {threads} thread each"
        runner = ConcurrentRunner(session.run, runners)  # what the local engine runs
        try:
            rates[label] = _run_ceiling(paths, loader, runner, batch, decode_threads)
        finally:
            runner.close()
    return rates


# -- 2. and 3. the engines ---------------------------------------------------------------------------


def bench_engine(engine: str, manifest: str, registry: Any, out: str, batch: int, fs: Any = None) -> dict[str, Any]:
    """One ``run_embed`` into ``out`` (a folder, or an ``s3://`` prefix on ``fs``); its rate counts
    from the first image (local: decode workers started and session loaded; Ray: the first actor
    ready) to the last shard written."""
    from embed import run_embed

    if fs is not None:
        if fs.exists(out):
            fs.rm(out, recursive=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
    summary = run_embed(
        MODEL,
        [str(manifest)],
        out,
        engine=engine,  # type: ignore[arg-type]
        batch_size=batch,
        shard_size=SHARD_SIZE,
        registry=registry,
        progress=False,
    )
    st = summary.stats
    return {
        "workers": st.workers,
        "threads": st.threads,
        "runners": st.runners,
        "images": summary.images_computed,
        "job": summary.images_per_s,
        "startup_s": st.startup_s,
        "run_s": st.run_s,
        "decode_s": st.decode_s,
        "infer_s": st.infer_s,
        "wait_s": st.wait_s,
    }


# -- the report ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from embed import EmbedConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder holding imagenet-sample/ (default ../shared/data)"
    )
    p.add_argument("--repeat", type=int, default=10, help="how many times the 100 photos are repeated")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (ceiling, local, ray); medians are reported")
    p.add_argument("--batch-size", type=int, default=EmbedConfig().batch_size, help="images per ONNX Runtime call")
    p.add_argument("--registry", type=Path, help="a BENTOML_HOME that already holds efficientnet_lite0")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    p.add_argument("--no-s3", action="store_true", help="skip the S3-to-S3 runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    return p.parse_args(argv)


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; each engine's ratios are taken against the ceiling of its own round."""
    configs = list(rounds[0]["ceiling"])
    out: dict[str, Any] = {"ceiling": {c: _median([r["ceiling"][c] for r in rounds]) for c in configs}}
    best = [max(r["ceiling"].values()) for r in rounds]
    out["ceiling_best"] = _median(best)
    out["engines"] = {}
    for engine in rounds[0]["engines"]:
        runs = [r["engines"][engine] for r in rounds]
        keys = ("job", "startup_s", "run_s", "decode_s", "infer_s", "wait_s")
        row = {k: _median([x[k] for x in runs]) for k in keys}
        row["ratio"] = _median([x["job"] / b for x, b in zip(runs, best, strict=True)])
        row["workers"], row["threads"], row["runners"] = runs[0]["workers"], runs[0]["threads"], runs[0]["runners"]
        row["cpu_share"] = _median([r["cpu_share"].get(engine) for r in rounds])
        disk = engine.removesuffix(S3_SUFFIX)
        if disk != engine and disk in rounds[0]["engines"]:
            row["vs_disk"] = _median([r["engines"][engine]["job"] / r["engines"][disk]["job"] for r in rounds])
        out["engines"][engine] = row
    out["ceiling_cpu_share"] = _median([r["cpu_share"]["ceiling"] for r in rounds])
    return out


def _fmt(v: float | None, spec: str = "7.1f") -> str:
    return format(v, spec) if v is not None else "n/a"


def print_table(r: dict[str, Any]) -> None:
    m, s = r["machine"], r["summary"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, GPU: {'yes' if m['gpu'] else 'no'}; python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, ray {m.get('ray', '-')}; {r['date']}"
    )
    print(
        f"workload: {r['images']} images ({r['photos']} photos of {r['data_name']} x {r['repeat']}), {MODEL}, "
        f"batch {r['batch_size']}, shards of {SHARD_SIZE}; medians of {r['rounds']} round(s)\n"
    )
    ct = r["core_time_model"]
    print(f"{'in-process ceiling (decode + ORT, no Parquet)':58} {'img/s':>7}")
    for config, ips in s["ceiling"].items():
        print(f"  {config:56} {_fmt(ips):>7}")
    print(f"  {'ceiling = best configuration':56} {_fmt(s['ceiling_best']):>7}")
    print(
        f"  {'(core-time model: ' + format(ct['decode_ms'], '.2f') + ' ms decode + ' + format(ct['infer_core_ms'], '.2f') + ' ms ORT/img on 1 core)':56} "
        f"{_fmt(ct['images_per_s']):>7}\n"
    )
    print(
        f"{'engine (writes Parquet)':43} {'img/s':>7} {'ratio':>6} {'s3/disk':>7} {'start-up s':>10}  "
        "time split (summed over workers)"
    )
    for name, e in s["engines"].items():
        local = name.startswith("local")
        unit = "decode worker" if local else "actor"
        ort = f"{e['runners']}x{e['threads']}" if e.get("runners", 1) > 1 else str(e["threads"])
        label = f"{name} ({e['workers']} {unit}(s), {ort} ORT thr)"
        split = f"decode {e['decode_s']:.1f} s, ORT {e['infer_s']:.1f} s"
        if local:
            split += f", ORT waiting for decode {e['wait_s']:.1f} s"
        vs_disk = _fmt(e.get("vs_disk"), "7.2f") if "vs_disk" in e else f"{'':7}"
        print(
            f"{label:43} {_fmt(e['job'])} {_fmt(e['ratio'], '6.2f')} {vs_disk} {_fmt(e['startup_s'], '10.1f')}  {split}"
        )
    shares = [f"ceiling {s['ceiling_cpu_share']:.0%}"] + [
        f"{k} {v['cpu_share']:.0%}" for k, v in s["engines"].items() if v["cpu_share"] is not None
    ]
    print(
        f"\nshare of the {m['cores']} cores this benchmark got (the rest went to other processes): {', '.join(shares)}"
    )


S3_OUT = "s3://bench-out"


@contextlib.contextmanager
def _s3_inputs(photos: Sequence[str], repeat: int) -> Iterator[tuple[str, Any]]:
    """A local S3 server holding the photos and a manifest of their URLs repeated ``repeat``
    times (as the disk manifest repeats their paths); yields the manifest's URL and a file system."""
    from tests.s3server import serve

    with serve(serialized=False) as s3:  # no conditional writes here: as fast as moto goes
        s3.bucket("bench-in")
        s3.bucket(S3_OUT.removeprefix("s3://"))
        urls = [s3.put(f"s3://bench-in/photos/{Path(p).name}", Path(p).read_bytes()) for p in photos]
        rows = [u for _ in range(repeat) for u in urls]
        manifest = s3.put(
            "s3://bench-in/inputs.csv", ("id,path\n" + "".join(f"{i},{u}\n" for i, u in enumerate(rows))).encode()
        )
        yield manifest, s3.fs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sample = args.data / SAMPLE_DIR
    photos = (
        sorted(str(p) for p in sample.glob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if sample.is_dir()
        else []
    )
    if not photos:
        print(f"bench_embed: no photos in {sample}; pass --data DIR holding {SAMPLE_DIR}/", file=sys.stderr)
        return 2

    import onnxruntime

    from models import ImageLoader, Registry
    from models.export import export_catalog
    from models.runtime import available_cores, gpu_driver_present

    cores = available_cores()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {
            "cpu": cpu_model(),
            "cores": cores,
            "gpu": gpu_driver_present(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
        },
        "data_name": "../shared/data/imagenet-sample" if args.data == DEFAULT_DATA else str(sample),
        "photos": len(photos),
        "repeat": args.repeat,
        "images": len(photos) * args.repeat,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "model": MODEL,
    }
    ray_mod = None
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        registry = Registry(args.registry or tmpdir / "registry")
        if not registry.versions(MODEL):
            print(f"exporting {MODEL} ...", file=sys.stderr)
            export_catalog(MODEL, registry=registry)
        version = registry.get(MODEL)
        loader = ImageLoader(version.spec.preprocess)
        model_file = version.file("model.onnx")
        paths = [p for _ in range(args.repeat) for p in photos]
        manifest = tmpdir / "inputs.csv"
        manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths)))
        for p in photos:  # the page cache holds the files for every part alike
            Path(p).read_bytes()
        results["core_time_model"] = core_time_model(paths, model_file, loader, args.batch_size, cores)
        s3 = None if args.no_s3 else stack.enter_context(_s3_inputs(photos, args.repeat))  # before Ray: its workers
        if not args.no_ray:  # inherit the AWS variables
            import ray

            from embed.ray_engine import init_local_ray

            ray_mod = ray
            results["machine"]["ray"] = ray.__version__
            init_local_ray()
        try:
            rounds = []
            for i in range(args.rounds):
                print(
                    f"round {i + 1}/{args.rounds}: ceiling, local engine{', ray engine' if ray_mod else ''}"
                    f"{', each also from S3 to S3' if s3 else ''}",
                    file=sys.stderr,
                )
                rnd: dict[str, Any] = {"cpu_share": {}, "engines": {}}
                share = CpuShare(cores)
                rnd["ceiling"] = bench_ceiling(paths, model_file, loader, args.batch_size, cores)
                rnd["cpu_share"]["ceiling"] = share.share()
                for engine in ["local"] + (["ray"] if ray_mod is not None else []):
                    share = CpuShare(cores)
                    rnd["engines"][engine] = bench_engine(
                        engine, str(manifest), registry, str(tmpdir / engine), args.batch_size
                    )
                    if engine == "local":
                        rnd["cpu_share"]["local"] = share.share()
                    if s3 is not None:
                        rnd["engines"][engine + S3_SUFFIX] = bench_engine(
                            engine, s3[0], registry, f"{S3_OUT}/{engine}", args.batch_size, s3[1]
                        )
                rounds.append(rnd)
        finally:
            if ray_mod is not None:
                ray_mod.shutdown()
    results["rounds_detail"] = rounds
    results["summary"] = summarize(rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

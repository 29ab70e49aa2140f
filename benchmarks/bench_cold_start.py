"""How long a replica takes to become ready when it serves from a registry in object storage:
from an empty local store (resolve the alias in the bucket, pull, check every file's sha256,
register with its preflight, load, measure the batch size, warm up) beside a restart on the
cache the first start left (no download; the checks and the warm-up again), in one run.

The bucket is moto's S3 server on this machine (tests/s3server.py), so the download is a local
copy: over a real network add the model's size divided by the bandwidth to the cold figure.
Each round starts `backbones serve --model NAME@production` once on a fresh store, then once more
on the store that start filled; seconds from the process start to the first 200 from /readyz.

Usage: uv run python benchmarks/bench_cold_start.py [--model efficientnet_lite0] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3server: the S3 server the tests use
import serve_servers

from tests.s3server import serve

PULLED = re.compile(r"pulled from \S+, verified and registered in ([0-9.]+) s")


def publish(model: str, work: Path) -> tuple[str, str]:
    """Export ``model`` on a "publisher" machine, push it to a new bucket, point production at it."""
    import s3fs

    from models import Registry
    from models.export import export_catalog
    from models.remote import RemoteRegistry

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/registry"
    publisher = Registry(work / "publisher")
    stored = export_catalog(model, registry=publisher)
    remote = RemoteRegistry(url)
    remote.push(publisher, stored.tag)
    remote.set_alias(stored.tag, "production")
    return url, stored.tag


def time_to_ready(home: Path, ref: str, url: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Start the server on ``home``; seconds until /readyz answers 200, then stop it."""
    environ = {**os.environ, **env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    environ.update(BACKBONES_REGISTRY_URL=url, BACKBONES_DRAIN_DELAY_SECONDS="0")
    server = serve_servers.backbones([ref], environ)
    started = time.monotonic()
    try:
        server.launch(log, timeout=600)
        ready = time.monotonic() - started
    finally:
        server.stop()
    pulls = [float(s) for s in PULLED.findall(log.read_text())]
    return {"seconds": round(ready, 2), "pull_seconds": pulls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with serve() as bucket:
        env = bucket.env
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
            work = Path(tmp)
            url, tag = publish(args.model, work)
            rounds = []
            for r in range(args.rounds):
                home = work / f"replica-{r}"
                cold = time_to_ready(home, f"{args.model}@production", url, env, work / f"cold-{r}.log")
                warm = time_to_ready(home, f"{args.model}@production", url, env, work / f"warm-{r}.log")
                rounds.append({"cold": cold, "warm": warm})
                if not args.json:
                    print(
                        f"round {r + 1}: empty cache {cold['seconds']:.1f} s (pull + verify + register "
                        f"{', '.join(f'{s:.1f}' for s in cold['pull_seconds'])} s), "
                        f"warm cache {warm['seconds']:.1f} s (downloads: {len(warm['pull_seconds'])})",
                        flush=True,
                    )
    cold_s = statistics.median(r["cold"]["seconds"] for r in rounds)
    warm_s = statistics.median(r["warm"]["seconds"] for r in rounds)
    summary = {
        "model": tag,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rounds": rounds,
        "cold_median_s": cold_s,
        "warm_median_s": warm_s,
        "cold_over_warm": round(cold_s / warm_s, 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{tag}: ready from an empty cache in {cold_s:.1f} s, from a warm cache in {warm_s:.1f} s ", end="")
    print(f"(median of {len(rounds)}; cold / warm = {summary['cold_over_warm']:.2f})")


if __name__ == "__main__":
    main()

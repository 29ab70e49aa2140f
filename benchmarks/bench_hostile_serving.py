"""The service under hostile traffic, measured in one run against `backbones serve` with its
default settings (one worker per core):

1. uploads: ``--clients`` clients (200) each stream a ``--body-mb`` (19 MB) multipart body over
   and over, at full speed, for ``--seconds``, while one client sends ordinary photos one after
   another. Printed: the growth of the server's resident memory (all its processes) over its
   idle footprint, the answers the uploads got, whether a worker was restarted, and the photo
   client's share of 200s and its p50.
   Targets: growth <= 1 GiB, no worker restarted, no 5xx but 503; photos >= 95 % 200, p50 <= 2 s.
2. path scan: `/metrics` lines before and after ``--paths`` (10,000) requests to random paths.
   Target: growth <= 10.

The upload bodies hold random bytes where the image goes: an upload that is admitted is read
whole and refused as undecodable (400); the cost of decoding the worst image is measured apart.

Usage: uv run python benchmarks/bench_hostile_serving.py [--seconds 30] [--clients 200]
[--body-mb 19] [--paths 10000] [--model efficientnet_lite0 | --tiny] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import multipart_request

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample"
GiB = 1024**3
MiB = 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    port: int
    proc: subprocess.Popen[bytes]

    def processes(self) -> list[psutil.Process]:
        """The arbiter and every process under it (the workers)."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.processes()[1:]}


@contextlib.contextmanager
def serving(home: Path, ref: str, **settings: str) -> Iterator[Running]:
    """`backbones serve` on a free port with the given settings (BACKBONES_*), until the block ends."""
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **settings}
    args = [sys.executable, "-m", "cli", "serve", "--model", ref, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server not ready within 300 s")
            time.sleep(0.5)
        yield Running(url, port, proc)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def post_raw(port: int, request: bytes, timeout: float = 120) -> int | None:
    """Send a whole request on a new connection; the answer's status, None if the server closed
    the connection without one reaching us."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # answered (and closed) before the body was all sent
            sock.sendall(request)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in data and (chunk := sock.recv(4096)):
                data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else None


@dataclass
class UploadResult:
    idle_rss: int
    peak_rss: int
    upload_statuses: Counter[int | None] = field(default_factory=Counter)
    photo_statuses: Counter[int | None] = field(default_factory=Counter)
    photo_latencies: list[float] = field(default_factory=list)
    workers_restarted: int = 0

    def summary(self) -> dict[str, object]:
        photos = sum(self.photo_statuses.values())
        other_5xx = sum(n for s, n in self.upload_statuses.items() if s is not None and s >= 500 and s != 503)
        return {
            "idle_rss_mib": round(self.idle_rss / MiB),
            "peak_rss_mib": round(self.peak_rss / MiB),
            "growth_mib": round((self.peak_rss - self.idle_rss) / MiB),
            "uploads": {str(k): v for k, v in sorted(self.upload_statuses.items(), key=str)},
            "uploads_5xx_but_503": other_5xx,
            "workers_restarted": self.workers_restarted,
            "photos": photos,
            "photos_200_share": round(self.photo_statuses[200] / photos, 3) if photos else None,
            "photos_p50_s": round(statistics.median(self.photo_latencies), 3) if self.photo_latencies else None,
        }


def flood_uploads(
    server: Running, photos: list[bytes], *, clients: int, body_mb: float, seconds: float
) -> UploadResult:
    """Section 1 (see the module docstring)."""
    junk = random.Random(0).randbytes(int(body_mb * 1_000_000))
    upload = multipart_request("127.0.0.1", "/classify", junk)
    time.sleep(2)  # settle after start-up and warm-up
    result = UploadResult(idle_rss=server.rss(), peak_rss=0)
    workers = server.worker_pids()
    stop = threading.Event()
    lock = threading.Lock()

    def uploader() -> None:
        while not stop.is_set():
            status = post_raw(server.port, upload)
            with lock:
                result.upload_statuses[status] += 1

    def photographer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status: int | None = client.post(
                        "/classify", files={"image": ("p.jpg", photos[i % len(photos)])}
                    ).status_code
                except httpx.HTTPError:
                    status = None
                result.photo_latencies.append(time.perf_counter() - started)
                result.photo_statuses[status] += 1
                i += 1

    def watcher() -> None:
        while not stop.is_set():
            result.peak_rss = max(result.peak_rss, server.rss())
            time.sleep(0.2)

    threads = [threading.Thread(target=uploader, daemon=True) for _ in range(clients)]
    threads += [threading.Thread(target=photographer, daemon=True), threading.Thread(target=watcher, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    result.workers_restarted = len(workers - server.worker_pids())
    return result


def metrics_lines(server: Running) -> int:
    return len(httpx.get(server.url + "/metrics", timeout=60).text.splitlines())


def scan_paths(server: Running, paths: int) -> dict[str, object]:
    """Section 2: /metrics lines before and after ``paths`` requests to random paths."""
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + "-._~"
    # a letter first: "/." and "/.." would be the index page once the client normalizes them
    targets = [
        "/" + rng.choice(string.ascii_letters) + "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        for _ in range(paths)
    ]
    httpx.get(server.url + "/nope", timeout=30)  # the shared label's series exist from here on
    before = metrics_lines(server)
    statuses: Counter[int] = Counter()

    def scan(chunk: list[str]) -> Counter[int]:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return Counter(client.get(path).status_code for path in chunk)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for counted in pool.map(scan, [targets[i::8] for i in range(8)]):
            statuses += counted
    elapsed = time.perf_counter() - started
    after = metrics_lines(server)
    return {
        "paths": paths,
        "seconds": round(elapsed, 1),
        "statuses": dict(statuses),
        "metrics_lines_before": before,
        "metrics_lines_after": after,
        "growth": after - before,
    }


def load_photos() -> list[bytes]:
    if DEFAULT_DATA.is_dir():
        return [p.read_bytes() for p in sorted(DEFAULT_DATA.iterdir())[:32] if p.is_file()]
    import io

    from models.samples import synthetic_image

    out = []
    for i in range(16):
        buf = io.BytesIO()
        synthetic_image(i, (500, 375)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--body-mb", type=float, default=19.0)
    parser.add_argument("--paths", type=int, default=10_000)
    parser.add_argument("--model", default="efficientnet_lite0", help="a catalog model, exported into a fresh registry")
    parser.add_argument("--tiny", action="store_true", help="serve the tiny test CNN (a quick run)")


def measure(args: argparse.Namespace) -> dict[str, object]:
    """The upload flood with a photo client beside it, then the random-path scan, on a fresh server."""
    from models import Registry
    from models.export import export_catalog

    model = "tiny_cnn" if args.tiny else args.model
    photos = load_photos()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "bentoml"
        export_catalog(model, registry=Registry(home))
        with serving(home, model) as server:
            for photo in photos[:4]:  # warm-up
                httpx.post(server.url + "/classify", files={"image": ("p.jpg", photo)}, timeout=60)
            uploads = flood_uploads(server, photos, clients=args.clients, body_mb=args.body_mb, seconds=args.seconds)
            scan = scan_paths(server, args.paths)
    return {
        "machine": f"{os.cpu_count()} cores",
        "model": model,
        "uploads": {"clients": args.clients, "body_mb": args.body_mb, "seconds": args.seconds, **uploads.summary()},
        "scan": scan,
    }


def print_report(report: dict[str, object]) -> None:
    u, s = report["uploads"], report["scan"]
    assert isinstance(u, dict) and isinstance(s, dict)
    print(
        f"{report['model']} on {report['machine']}, {u['clients']} clients streaming {u['body_mb']:g} MB bodies "
        f"for {u['seconds']:g} s"
    )
    print(
        f"  memory: idle {u['idle_rss_mib']} MiB, peak {u['peak_rss_mib']} MiB, growth {u['growth_mib']} MiB "
        f"(target <= 1024); workers restarted: {u['workers_restarted']} (target 0)"
    )
    print(
        f"  upload answers: {u['uploads']} (None: closed without an answer); 5xx but 503: {u['uploads_5xx_but_503']} (target 0)"
    )
    print(
        f"  photo client: {u['photos']} requests, {u['photos_200_share']} answered 200 (target >= 0.95), "
        f"p50 {u['photos_p50_s']} s (target <= 2)"
    )
    print(
        f"path scan: {s['paths']} random paths in {s['seconds']} s, answers {s['statuses']}; /metrics "
        f"{s['metrics_lines_before']} -> {s['metrics_lines_after']} lines, growth {s['growth']} (target <= 10)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)


if __name__ == "__main__":
    main()

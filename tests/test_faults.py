"""Faults the service survives, each proven against the real server: SIGTERM under load, a killed
worker, a model or registry that is not there at start-up, a soak, slow uploads, bad settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from models import Registry
from models.export import export_catalog

from .conftest import jpeg_bytes
from .serving import FORM_TYPE, Server, image_upload, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@dataclass(eq=False)  # threads must stay hashable
class SlowUpload(threading.Thread):
    """One POST whose body goes out in ``chunks`` pieces spread over ``seconds``, over a raw socket
    (HTTP clients send a body as fast as they can)."""

    port: int
    route: str
    body: bytes
    content_type: str
    seconds: float
    chunks: int = 20
    status: int | None = None
    response: bytes = b""
    error: str | None = None
    sent_all_at: float | None = None
    answered_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                head = (
                    f"POST {self.route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {self.content_type}\r\n"
                    f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
                )
                sock.sendall(head.encode())
                step = -(-len(self.body) // self.chunks)
                try:
                    for i in range(0, len(self.body), step):
                        time.sleep(self.seconds / self.chunks)
                        sock.sendall(self.body[i : i + step])
                    self.sent_all_at = time.monotonic()
                except OSError:  # the server answered (and closed) before the body was complete
                    pass
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                self.answered_at = time.monotonic()
                header, _, self.response = data.partition(b"\r\n\r\n")
                self.status = int(header.split(b" ", 2)[1]) if header else None
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()


@dataclass
class Outcome:
    started: float
    finished: float
    status: int | None  # None: no HTTP answer (connection refused or reset)
    error: str = ""


def hammer(server: Server, stop: threading.Event, outcomes: list[Outcome], image: bytes) -> None:
    """Classify ``image`` in a loop, one fresh connection per request, until ``stop`` is set."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            r = server.post("/classify", image, timeout=30, top_k="1")
            outcomes.append(Outcome(started, time.monotonic(), r.status_code, "" if r.is_success else r.text))
        except httpx.HTTPError as e:
            outcomes.append(Outcome(started, time.monotonic(), None, f"{type(e).__name__}: {e}"))


# -- shutdown -------------------------------------------------------------------------------------


def start_draining(registry: Registry, tmp_path: Path, *, workers: int, delay: float, drain: float) -> Server:
    """The tiny CNN served by ``workers`` workers that drain for ``delay`` + ``drain`` seconds on SIGTERM."""
    return start_server(
        registry.home,
        ["tiny_cnn"],
        tmp_path / "server.log",
        BACKBONES_WORKERS=str(workers),
        BACKBONES_DRAIN_DELAY_SECONDS=str(delay),
        BACKBONES_DRAIN_SECONDS=str(drain),
    )


def test_sigterm_drains_under_load(tiny_registry: Registry, tmp_path: Path) -> None:
    """SIGTERM to the server (as Kubernetes sends it): /readyz goes 503 first while requests are
    still answered, a request in flight when the listener closes finishes, nothing accepted fails,
    and the process exits within its grace period."""
    delay, drain = 1.5, 10.0
    server = start_draining(tiny_registry, tmp_path, workers=2, delay=delay, drain=drain)
    try:
        image = jpeg_bytes(0)
        stop, outcomes = threading.Event(), list[Outcome]()
        clients = [threading.Thread(target=hammer, args=(server, stop, outcomes, image)) for _ in range(6)]
        for t in clients:
            t.start()
        # in flight across the moment the listener closes: its body arrives ~1.5 s after that
        slow = SlowUpload(server.port, "/classify", image_upload(image, top_k="1"), FORM_TYPE, seconds=delay + 1.5)
        slow.start()
        time.sleep(0.5)
        probes: list[tuple[float, int, dict[str, Any]]] = []
        sigterm_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)  # to the arbiter only, like a pod's PID 1
        while time.monotonic() < sigterm_at + 0.6 * delay:  # a load balancer still routing here
            r = httpx.get(server.url + "/readyz", timeout=5)
            probes.append((time.monotonic(), r.status_code, r.json() if r.status_code == 503 else {}))
            time.sleep(0.05)
        stop.set()  # ... until it has seen /readyz fail
        for t in clients:
            t.join()
        server.proc.wait(timeout=delay + drain + 10)
        exited_at = time.monotonic()
        slow.join(timeout=10)
    finally:
        stop_server(server)

    # the arbiter passes SIGTERM on within milliseconds; from then on /readyz says "draining"
    first = next(i for i, (_, status, _) in enumerate(probes) if status == 503)
    assert all(status == 503 and doc == {"ready": False, "reason": "draining"} for _, status, doc in probes[first:])
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:3]
    during_delay = [o for o in outcomes if o.started > probes[first][0]]
    assert during_delay, "no request was answered after /readyz turned 503"
    assert slow.status == 200, (slow.error, slow.response[:300])
    assert json.loads(slow.response)["predictions"]
    assert slow.sent_all_at is not None and slow.sent_all_at > sigterm_at + delay  # it really was in flight
    print(f"exited {exited_at - sigterm_at:.1f} s after SIGTERM; {len(outcomes)} requests, none failed")
    assert delay <= exited_at - sigterm_at <= delay + drain + 5
    assert "SIGTERM: draining" in server.log.read_text()


def test_sigterm_cuts_a_request_that_outlasts_the_drain(tiny_registry: Registry, tmp_path: Path) -> None:
    """A request still running after drain_seconds does not hold the process: it exits in time."""
    delay, drain = 0.5, 1.5
    server = start_draining(tiny_registry, tmp_path, workers=1, delay=delay, drain=drain)
    try:
        slow = SlowUpload(server.port, "/classify", image_upload(jpeg_bytes(0)), FORM_TYPE, seconds=30)
        slow.start()
        time.sleep(0.5)
        sigterm_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=delay + drain + 10)
        took = time.monotonic() - sigterm_at
    finally:
        stop_server(server)
    print(f"exited {took:.1f} s after SIGTERM with a 30 s upload in flight")
    assert took <= delay + drain + 5
    slow.join(timeout=10)
    assert slow.status != 200


# -- start-up faults ------------------------------------------------------------------------------


def start_unready(home: Path, ref: str, tmp_path: Path, *, retry_max_seconds: float) -> Server:
    """One worker serving ``ref``, which cannot load yet: returns once the worker is alive."""
    return start_server(
        home,
        [ref],
        tmp_path / "server.log",
        wait_for="/livez",
        BACKBONES_WORKERS="1",
        BACKBONES_LOAD_RETRY_MAX_SECONDS=str(retry_max_seconds),
    )


def unready_reasons(server: Server) -> dict[str, Any]:
    """/readyz's 503 body, once it answers 503."""
    r = wait_for(lambda: (r := httpx.get(server.url + "/readyz")).status_code == 503 and r, 30, "readyz 503")
    return r.json()  # type: ignore[no-any-return]


def test_a_model_that_fails_to_load_is_retried_with_backoff_until_fixed(tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    stored = export_catalog("tiny_cnn", registry=Registry(home))
    onnx = stored.path / "model.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(good[:-10] + b"0123456789")
    server = start_unready(home, stored.tag, tmp_path, retry_max_seconds=2)
    try:
        doc = unready_reasons(server)
        assert doc["ready"] is False and doc["reason"] == "models not loaded"
        assert "modified after registration" in doc["models"][stored.tag]
        assert httpx.get(server.url + "/livez").status_code == 200
        c = server.post("/classify", jpeg_bytes(0))
        assert c.status_code == 503 and c.headers["retry-after"] and "not loaded" in c.json()["error"]
        # backoff: 1 s, 2 s, then capped at load_retry_max_seconds
        wait_for(lambda: server.log.read_text().count("next attempt in 2.0 s") >= 2, 30, "backoff reached its cap")
        assert "next attempt in 1.0 s" in server.log.read_text()
        assert "next attempt in 4.0 s" not in server.log.read_text()
        onnx.write_bytes(good)  # fixed: picked up by the next attempt
        wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 200, 30, "ready once fixed")
        assert server.post("/classify", jpeg_bytes(0)).json()["model"] == stored.tag
    finally:
        stop_server(server)


def test_registry_missing_at_start_then_created_then_deleted(tmp_path: Path) -> None:
    home = tmp_path / "nowhere" / "bentoml"
    server = start_unready(home, "mynet@production", tmp_path, retry_max_seconds=1)
    try:
        assert "mynet" in unready_reasons(server)["models"]["mynet@production"]
        assert httpx.get(server.url + "/livez").status_code == 200
        reg = Registry(home)
        stored = export_catalog("tiny_cnn", registry=reg, as_name="mynet")
        reg.set_alias(stored.tag, "production")
        wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 200, 30, "ready once the registry exists")
        # a registry that disappears under a running server: the loaded model keeps serving. (Its
        # versions and aliases go; BENTOML_HOME itself stays: BentoML keeps its metric files there.)
        shutil.rmtree(reg.models_dir)
        shutil.rmtree(home / "backbones")
        wait_for(
            lambda: httpx.get(server.url + "/models").json()["models"][0]["last_error"],
            30,
            "the lost registry reported in /models",
        )
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert server.post("/classify", jpeg_bytes(0)).json()["model"] == stored.tag
    finally:
        stop_server(server)


def test_a_bad_setting_is_one_clear_line(run_cli: Callable[..., Any]) -> None:
    r = run_cli("serve", extra_env={"BACKBONES_DRAIN_SECONDS": "soon", "BACKBONES_QUEUE_LIMIT": "0"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "BACKBONES_DRAIN_SECONDS='soon'" in lines[0] and "BACKBONES_QUEUE_LIMIT='0'" in lines[0]


# -- under way --------------------------------------------------------------------------------------


def test_soak_keeps_memory_flat(tiny_server: Server) -> None:
    """~3000 requests at 48 clients: all answered, resident memory of the server's processes flat."""
    images = [jpeg_bytes(i) for i in range(8)]

    def run(n: int, clients: int) -> list[int]:
        def client(k: int) -> list[int]:
            with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
                return [
                    c.post("/classify", files={"image": ("a.jpg", images[(k + i) % 8])}).status_code
                    for i in range(n // clients)
                ]

        with ThreadPoolExecutor(clients) as pool:
            return [s for batch in pool.map(client, range(clients)) for s in batch]

    assert set(run(480, 48)) == {200}  # warm-up: allocator pools, thread pools, batch shapes
    before = tiny_server.rss_bytes()
    statuses = run(3024, 48)
    after = tiny_server.rss_bytes()
    print(f"soak: {len(statuses)} requests, RSS {before / MiB:.1f} MiB -> {after / MiB:.1f} MiB")
    assert statuses.count(200) == len(statuses) == 3024
    assert after - before <= 50 * MiB


def test_slow_uploads_do_not_stall_other_clients_and_time_out(tiny_server: Server) -> None:
    body = image_upload(jpeg_bytes(0))
    slow = [SlowUpload(tiny_server.port, "/classify", body, FORM_TYPE, seconds=60, chunks=60) for _ in range(8)]
    for s in slow:
        s.start()
    time.sleep(0.5)
    fast = [tiny_server.post("/classify", jpeg_bytes(i % 4), top_k="1") for i in range(40)]
    fast_done = time.monotonic()
    assert [r.status_code for r in fast] == [200] * 40
    for s in slow:
        s.join(timeout=30)
    # every slow upload was still under way when the fast clients had all been answered; each then
    # got the request timeout's 504 (10 s in the tiny_server), not a hang
    assert all(s.answered_at is not None and s.answered_at > fast_done for s in slow)
    assert {s.status for s in slow} == {504}, [(s.status, s.error) for s in slow]
    assert "error" in json.loads(slow[0].response)
    assert all(s.sent_all_at is None for s in slow)


def test_a_killed_worker_is_replaced_and_other_requests_are_unaffected(tiny_server: Server) -> None:
    workers = tiny_server.workers()
    assert len(workers) == 2
    loaded_before = tiny_server.log.read_text().count(" serves tiny_cnn:")
    stop, outcomes = threading.Event(), list[Outcome]()
    clients = [threading.Thread(target=hammer, args=(tiny_server, stop, outcomes, jpeg_bytes(1))) for _ in range(6)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    victim = workers[0]
    victim.kill()
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    new = wait_for(
        lambda: [p for p in tiny_server.workers() if p.pid not in {w.pid for w in workers}],
        10,
        "a replacement worker",
    )
    wait_for(
        lambda: tiny_server.log.read_text().count(" serves tiny_cnn:") > loaded_before,
        30,
        "the replacement loaded its model",
    )
    time.sleep(0.5)
    stop.set()
    for t in clients:
        t.join()
    print(f"worker {victim.pid} killed, replaced by {new[0].pid}; {len(outcomes)} requests")
    assert len(tiny_server.workers()) == 2 and psutil.pid_exists(new[0].pid)
    # only requests the killed worker held could fail, and only as a lost connection, never a 5xx
    assert all(o.status in (200, None) for o in outcomes), [o for o in outcomes if o.status not in (200, None)][:3]
    assert len([o for o in outcomes if o.status is None]) <= len(clients)
    after = [o for o in outcomes if o.started >= killed_at]
    assert after and all(o.status == 200 for o in after), [o for o in after if o.status != 200][:3]
    assert httpx.get(tiny_server.url + "/readyz").status_code == 200

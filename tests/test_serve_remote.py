"""`backbones serve` following a registry in object storage: the real server (two workers) with an
empty local store, against moto's S3 server (tests/s3server.py) reached through a gate the test
can close and reopen, so the bucket can go away and come back with its content.

Cold start (pull, verify, preflight, serve; one download for the machine), an alias moved in the
bucket under load (no failed request), the bucket gone under a running server (the loaded version
keeps answering, /readyz and /models say why nothing newer loads) and back (followed again), and
two processes pulling one version at once (one download)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from models import Registry, StoredVersion
from models.export import export_catalog
from models.remote import RemoteRegistry

from .conftest import ROOT, jpeg_bytes
from .serving import Server, free_port, start_server, stop_server, wait_for
from .test_remote import tamper

if TYPE_CHECKING:
    from .s3server import S3Server

pytest_plugins = ("tests.s3server",)  # the session's S3 server: the fixture ``s3``
pytestmark = pytest.mark.slow

REF = "tiny_cnn@production"
POLL_SECONDS = 0.2
RETRY_MAX_SECONDS = 1.0
SWITCH_WITHIN = 45.0  # poll + pull + preflight in a child process + warm-up, on 2 shared cores
PULLED = "pulled from"  # the line a worker logs when it downloaded a version


class Gate:
    """A TCP forwarder on a port of its own to the S3 server: closed, nothing listens there
    (connections refused, open ones cut), as when the store goes away; reopened on the same port."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@dataclass
class Bucket:
    url: str
    port: int  # the S3 server's
    publisher: Registry
    versions: list[StoredVersion]  # two versions of tiny_cnn (same graph, other lineage)

    def move(self, version: StoredVersion) -> None:
        RemoteRegistry(self.url).set_alias(version.tag, "production")

    def production(self) -> str:
        return RemoteRegistry(self.url).aliases("tiny_cnn")["production"]


@pytest.fixture(scope="module")
def bucket(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Bucket:
    """The bucket, as a publisher left it: two versions, production on the first."""
    url = s3.bucket("serve-remote") + "/registry"
    publisher = Registry(tmp_path_factory.mktemp("publisher") / "bentoml")
    first = export_catalog("tiny_cnn", registry=publisher)
    fields = first.spec.model_dump(exclude={"name", "version", "created_at", "files"})
    second = publisher.register(
        "tiny_cnn", {f: first.file(f) for f in first.spec.files}, {**fields, "parent": first.tag}
    )
    remote = RemoteRegistry(url)
    for v in (first, second):
        remote.push(publisher, v.tag)
    remote.set_alias(first.tag, "production")
    return Bucket(url, s3.port, publisher, [first, second])


@dataclass
class Following:
    server: Server
    gate: Gate
    home: Path


@pytest.fixture(scope="module")
def following(bucket: Bucket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Following]:
    """`backbones serve --model tiny_cnn@production`, two workers, an empty local store, the bucket
    behind the gate."""
    gate = Gate(bucket.port)
    home = tmp_path_factory.mktemp("replica") / "bentoml"
    server = start_server(
        home,
        [REF],
        tmp_path_factory.mktemp("replica-log") / "server.log",
        BACKBONES_REGISTRY_URL=bucket.url,
        AWS_ENDPOINT_URL=gate.url,
        AWS_MAX_ATTEMPTS="2",
        BACKBONES_WORKERS="2",
        BACKBONES_SWAP_POLL_SECONDS=str(POLL_SECONDS),
        BACKBONES_LOAD_RETRY_MAX_SECONDS=str(RETRY_MAX_SECONDS),
    )
    try:
        yield Following(server, gate, home)
    finally:
        stop_server(server)
        gate.close()


@dataclass
class Clients:
    """Threads sending /classify back to back until stopped: every answer's time, status and model."""

    url: str
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Clients:
        for i in range(4):
            t = threading.Thread(target=self._send, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _send(self, i: int) -> None:
        image = jpeg_bytes(i)
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(self.url + "/classify", files={"image": ("a.jpg", image, "image/jpeg")})
                    model = r.json().get("model", "") if r.status_code == 200 else r.text[:200]
                    self.answers.append((time.monotonic(), r.status_code, model))
                except httpx.HTTPError as e:
                    self.answers.append((time.monotonic(), 0, repr(e)))

    def failures(self) -> list[tuple[float, int, str]]:
        return [a for a in self.answers if a[1] != 200]

    def models_since(self, since: float) -> list[str]:
        return [m for t, status, m in list(self.answers) if t >= since and status == 200]


def all_answer_with(clients: Clients, tag: str, since: float, count: int = 40) -> bool:
    """The last ``count`` answers (all after ``since``) came from ``tag``: both workers switched."""
    recent = clients.models_since(since)[-count:]
    return len(recent) == count and set(recent) == {tag}


def other_than_served(bucket: Bucket, following: Following) -> StoredVersion:
    served = httpx.get(following.server.url + "/models", timeout=30).json()["models"][0]["version"]
    return next(v for v in bucket.versions if v.spec.version != served)


# -- the tests ---------------------------------------------------------------------------------


def test_a_replica_with_an_empty_store_pulls_verifies_and_serves(bucket: Bucket, following: Following) -> None:
    first = bucket.versions[0]
    server = following.server
    doc = httpx.get(server.url + "/models", timeout=30).json()
    (model,) = doc["models"]
    assert doc["ready"] is True and model["tag"] == first.tag and model["last_error"] is None
    assert model["aliases"] == {"production": first.spec.version}  # as read from the bucket
    r = server.post("/classify", jpeg_bytes(0))
    assert r.status_code == 200 and r.json()["model"] == first.tag
    # the version is in the local store, checked against the sha256 of every file, preflighted
    cached = Registry(following.home).get(first.tag)
    assert cached.spec == first.spec
    for f in first.spec.files:
        assert cached.file(f).read_bytes() == first.file(f).read_bytes(), f
    assert any(Registry(following.home).own_dir("preflight").iterdir())
    # two workers, one download: the other worker found it in the cache
    log = server.log.read_text()
    assert log.count(PULLED) == 1 and f"{first.tag}: {PULLED} {bucket.url}" in log, log[-3000:]


def test_serve_follows_an_alias_moved_in_the_bucket_without_a_failed_request(
    bucket: Bucket, following: Following
) -> None:
    target = other_than_served(bucket, following)
    pulled_before = following.server.log.read_text().count(PULLED)
    with Clients(following.server.url) as clients:
        wait_for(lambda: len(clients.answers) > 20, 60, "clients answered")
        moved = time.monotonic()
        bucket.move(target)
        wait_for(lambda: all_answer_with(clients, target.tag, moved), SWITCH_WITHIN, "every worker on the new version")
        switched = time.monotonic() - moved
    assert clients.failures() == [], clients.failures()[:5]
    assert switched < SWITCH_WITHIN
    doc = httpx.get(following.server.url + "/models", timeout=30).json()
    assert doc["models"][0]["tag"] == target.tag and doc["models"][0]["aliases"]["production"] == target.spec.version
    # pulled once for the machine, by whichever worker came first
    assert following.server.log.read_text().count(PULLED) == pulled_before + 1


def test_the_bucket_going_away_leaves_the_loaded_version_serving_then_it_follows_again(
    bucket: Bucket, following: Following
) -> None:
    server = following.server
    served = next(v for v in bucket.versions if v.tag == server.post("/classify", jpeg_bytes(0)).json()["model"])
    target = other_than_served(bucket, following)
    warnings_before = server.log.read_text().count("next check in")
    with Clients(server.url) as clients:
        wait_for(lambda: len(clients.answers) > 20, 60, "clients answered")
        following.gate.close()
        gone = time.monotonic()
        bucket.move(target)  # the replica cannot see this while the bucket is unreachable
        readyz = wait_for(
            lambda: (
                (r := httpx.get(server.url + "/readyz", timeout=30)).headers.get("content-type") == "application/json"
                and r
            ),
            30,
            "/readyz naming the unreachable bucket",
        )
        assert readyz.status_code == 200  # still serving: not taken out of rotation
        body = readyz.json()
        # why: the registry could not be read (the URL itself is redacted: no host names reach clients)
        assert body["ready"] is True and "failed" in body["models"][REF], body
        assert bucket.url not in json.dumps(body)
        model = wait_for(
            lambda: (m := httpx.get(server.url + "/models", timeout=30).json()["models"][0])["last_error"] and m,
            30,
            "/models naming the unreachable bucket",
        )
        assert model["tag"] == served.tag and "failed" in model["last_error"] and bucket.url not in model["last_error"]
        time.sleep(3)  # a few polls and retries while the bucket is gone
        outage = time.monotonic() - gone
        assert set(clients.models_since(gone)) == {served.tag}
        assert httpx.get(server.url + "/livez", timeout=30).status_code == 200

        following.gate.open()
        back = time.monotonic()
        wait_for(lambda: all_answer_with(clients, target.tag, back), SWITCH_WITHIN, "following the bucket again")
    assert clients.failures() == [], clients.failures()[:5]
    wait_for(
        lambda: all(
            httpx.get(server.url + "/models", timeout=30).json()["models"][0]["last_error"] is None for _ in range(6)
        ),
        30,
        "the error cleared in every worker",
    )
    readyz = httpx.get(server.url + "/readyz", timeout=30)
    assert readyz.status_code == 200 and readyz.headers.get("content-type") != "application/json"
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    # one warning per failed check, the checks backed off up to load_retry_max_seconds (not every poll)
    warnings = log.count("next check in") - warnings_before
    assert 2 <= warnings <= 2 * (outage / RETRY_MAX_SECONDS + 4), warnings
    assert "answers again" in log


def test_a_version_damaged_in_the_bucket_is_refused_once_and_the_old_one_keeps_serving(
    bucket: Bucket, following: Following
) -> None:
    server = following.server
    served = next(v for v in bucket.versions if v.tag == server.post("/classify", jpeg_bytes(0)).json()["model"])
    first = bucket.versions[0]
    fields = first.spec.model_dump(exclude={"name", "version", "created_at", "files"})
    files = {f: first.file(f) for f in first.spec.files}
    damaged = bucket.publisher.register("tiny_cnn", files, {**fields, "parent": "catalog:damaged"})
    RemoteRegistry(bucket.url).push(bucket.publisher, damaged.tag)
    tamper(bucket.url, f"models/tiny_cnn/{damaged.spec.version}/model.onnx")
    refused_before = server.log.read_text().count("not switching")
    bucket.move(damaged)
    model = wait_for(
        lambda: (m := httpx.get(server.url + "/models", timeout=30).json()["models"][0])["last_error"] and m,
        30,
        "/models naming the damaged version",
    )
    assert model["tag"] == served.tag and "does not match the sha256" in model["last_error"]
    time.sleep(10 * POLL_SECONDS)  # many polls: the damaged version is not downloaded again on each
    assert server.log.read_text().count("not switching") - refused_before == 2  # once per worker
    assert server.post("/classify", jpeg_bytes(0)).json()["model"] == served.tag
    assert damaged.spec.version not in {s.version for s in Registry(following.home).versions("tiny_cnn")}
    bucket.move(served)  # rolled back: nothing is pending any more
    wait_for(
        lambda: all(
            httpx.get(server.url + "/models", timeout=30).json()["models"][0]["last_error"] is None for _ in range(6)
        ),
        30,
        "the error cleared once the alias is back",
    )


PULL_AT_ONCE = """
import logging, os, sys, time
from models import Registry
from service.source import RemoteSource

home, url, ref, go = sys.argv[1:5]
logging.basicConfig(level=logging.WARNING, format="%(message)s")
source = RemoteSource(url, Registry(home), retry_max_seconds=1)
source.resolve(ref)  # connected and ready
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
print(source.get(ref).tag, flush=True)
"""


def test_two_processes_pulling_one_version_at_once_download_it_once(bucket: Bucket, tmp_path: Path) -> None:
    home, go, tag = tmp_path / "bentoml", tmp_path / "go", bucket.versions[1].tag
    pullers = [
        subprocess.Popen(
            [sys.executable, "-c", PULL_AT_ONCE, str(home), bucket.url, tag, str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in pullers:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    logs = []
    for p in pullers:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out.strip() == tag, err[-2000:]
        logs.append(err)
    assert sum(err.count(PULLED) for err in logs) == 1, logs
    assert [s.tag for s in Registry(home).list()] == [tag]

"""Hostile traffic against the real server (one worker, tight limits, started on a free port):
malformed and oversized request heads, conflicting lengths, slow heads, connection floods, bodies
that do not fit the receive budget, path scans, clients that leave, a model that answers NaN, and
no file-system path, host name or stack text in any JSON body."""

from __future__ import annotations

import io
import json
import socket
import string
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models import Registry
from models.spec import ONNX_FILENAME, Architecture, Preprocess

from .conftest import fuzz_budget, jpeg_bytes, registry_with
from .serving import (
    FORM_TYPE,
    Server,
    form_body,
    image_upload,
    raw_request,
    read_answer,
    start_server,
    stop_server,
    upload_head,
)

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 24
MAX_REQUEST = 4 * MiB
BUDGET = 8 * MiB  # large bodies: over 1 MiB, together at most 4 MiB
MAX_HEADER_BYTES = 8 * 1024
MAX_HEADERS = 32
CROP = 8


def nan_graph(path: Path) -> Path:
    """A head whose logits are log(features + 0.5): finite for the zeros preflight runs, NaN for a
    dark image (normalized pixels near -2), finite for a bright one. Its features stay finite."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Add", ["features", "half"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["logged"]),
        helper.make_node("MatMul", ["logged", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, CROP, CROP])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]),
        ],
        [w, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def register_head(reg: Registry, name: str, tmp: Path) -> Path:
    """Register the NaN head as ``name``, with a training record full of machine paths (as a
    fine-tuned version has); returns its stored folder."""
    fields: dict[str, Any] = {
        "parent": "test",
        "architecture": Architecture(family="builtin", name="tiny_cnn", num_classes=4),
        "labels": [f"c{i}" for i in range(4)],
        "preprocess": Preprocess(resize=CROP, crop=CROP),
        "feature_dim": 3,
        "opset": 17,
        "exporter": {},
        "source": {"weights": str(tmp / "weights" / "head.safetensors")},
        "training": {"data_dir": str(tmp / "private-data"), "run_dir": str(tmp / "runs" / "7"), "host": "trainer-7"},
    }
    return reg.register(name, {ONNX_FILENAME: nan_graph(tmp / f"{name}.onnx")}, fields).path


def solid_jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """tiny_cnn, the NaN head, and a model whose spec cannot be read (it never loads), served by
    one worker with tight limits."""
    tmp = tmp_path_factory.mktemp("hostile")
    reg = registry_with(tmp / "bentoml", "tiny_cnn")
    register_head(reg, "nanhead", tmp)
    bento_yaml = register_head(reg, "broken", tmp) / "model.yaml"
    bento_yaml.unlink()
    bento_yaml.mkdir()  # unreadable: the error names the file's full path
    server = start_server(
        reg.home,
        ["tiny_cnn", "nanhead", "broken"],
        tmp / "server.log",
        wait_for="/livez",  # /readyz stays 503: "broken" never loads
        BACKBONES_WORKERS="1",
        BACKBONES_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        BACKBONES_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        BACKBONES_MAX_REQUEST_BYTES=str(MAX_REQUEST),
        BACKBONES_RECEIVE_BUDGET_BYTES=str(BUDGET),
        BACKBONES_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        BACKBONES_MAX_HEADERS=str(MAX_HEADERS),
        BACKBONES_REQUEST_TIMEOUT_SECONDS="15",
    )
    yield server
    stop_server(server)


def healthy(server: Server) -> None:
    """The worker that started is still the one answering, and it answers."""
    assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
    assert server.post("/classify", jpeg_bytes(1), model="tiny_cnn").status_code == 200


# -- malformed requests ---------------------------------------------------------------------------

BIG = "a" * (2 * MAX_HEADER_BYTES)
MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "unknown version": b"GET /livez HTTP/9.9\r\n\r\n",
    "NUL in the target": b"GET /li\x00vez HTTP/1.1\r\nHost: x\r\n\r\n",
    "a TLS hello": bytes.fromhex("16030100a5010000a10303") + bytes(64),
    "header without a colon": b"GET /livez HTTP/1.1\r\nHost x\r\n\r\n",
    "space before the colon": b"GET /livez HTTP/1.1\r\nHost : x\r\n\r\n",
    "folded header": b"GET /livez HTTP/1.1\r\nHost: x\r\n  folded\r\n\r\n",
    "length and chunked": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two lengths": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "negative length": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "length not a number": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
    "bad chunk size": b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "unknown transfer coding": b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "huge header value": f"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: {BIG}\r\n\r\n".encode(),
    "huge target": f"GET /{BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "many headers": b"GET /livez HTTP/1.1\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 8))
    + b"\r\n",
    "endless header": b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"b" * (4 * MAX_HEADER_BYTES),
}


def test_malformed_requests_get_a_4xx_or_a_closed_connection(guarded: Server) -> None:
    pid = guarded.workers()[0].pid
    for case, data in MALFORMED.items():
        answer = raw_request(guarded.port, data, timeout=HEADER_TIMEOUT + 5)
        assert answer.closed, (case, answer)  # never left hanging
        assert answer.status is None or 400 <= answer.status < 500, (case, answer)
        if answer.status is not None:
            assert b"connection: close" in answer.head.lower(), case
            assert answer.json()["error"], case
    # oversized heads are refused on their size, at once, not at the header timeout
    for case in ("huge header value", "huge target", "many headers", "endless header"):
        answer = raw_request(guarded.port, MALFORMED[case], timeout=HEADER_TIMEOUT + 5)
        assert answer.status == 431 and answer.seconds < HEADER_TIMEOUT, (case, answer)
    for case in ("length and chunked", "two lengths", "negative length", "bad chunk size"):
        assert raw_request(guarded.port, MALFORMED[case]).status == 400, case
    assert [p.pid for p in guarded.workers()] == [pid]
    healthy(guarded)


@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), **fuzz_budget(25))
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "BOGUS", "G\x00T", ""]),
    target=st.text(st.characters(codec="latin-1"), max_size=40),
    headers=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=30)), max_size=6),
    tail=st.binary(max_size=64),
)
def test_fuzzed_heads_never_get_a_5xx_or_a_stuck_connection(
    guarded: Server, method: str, target: str, headers: list[tuple[str, str]], tail: bytes
) -> None:
    lines = [f"{method} /{target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    data = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + tail
    answer = raw_request(guarded.port, data + b"\r\n\r\n", timeout=HEADER_TIMEOUT + 5)
    assert answer.status is None or answer.status < 500 or answer.status == 503, answer
    assert answer.closed or answer.status is not None, answer  # answered, or closed: never stuck


# -- slow heads and connection floods ---------------------------------------------------------------


def test_a_slow_head_is_cut_at_the_header_timeout_and_others_are_served(guarded: Server) -> None:
    results: list[Any] = []

    def slowloris() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
            try:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                for _ in range(40):  # one byte every 0.25 s: 10 s if nobody stopped it
                    time.sleep(0.25)
                    sock.sendall(b"a")
            except OSError:
                pass
            results.append(read_answer(sock, started, 30))

    slow = [threading.Thread(target=slowloris) for _ in range(6)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    assert [guarded.post("/classify", jpeg_bytes(i), model="tiny_cnn").status_code for i in range(10)] == [200] * 10
    for t in slow:
        t.join(timeout=30)
    assert len(results) == 6
    for answer in results:
        assert answer.status == 408 and answer.closed, answer
        assert HEADER_TIMEOUT - 0.1 <= answer.seconds < HEADER_TIMEOUT + 2, answer
    # a connection that sends nothing at all is closed at the header timeout, without an answer
    silent = raw_request(guarded.port, b"", timeout=HEADER_TIMEOUT + 5)
    assert silent.closed and silent.status is None and silent.seconds < HEADER_TIMEOUT + 2, silent


def test_a_connection_flood_is_refused_with_503_and_drains(guarded: Server) -> None:
    pid = guarded.workers()[0].pid
    idle = [socket.create_connection(("127.0.0.1", guarded.port), timeout=10) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the worker has accepted them all
        over = raw_request(guarded.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert over.status == 503 and over.closed, over
        assert b"retry-after: 1" in over.head.lower() and "too many open connections" in over.json()["error"]
        time.sleep(HEADER_TIMEOUT + 1)  # the idle ones never sent a head: closed by now
        assert all(sock.recv(10) == b"" for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert raw_request(guarded.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
    assert [p.pid for p in guarded.workers()] == [pid]
    healthy(guarded)


# -- bodies -------------------------------------------------------------------------------------------


def test_bodies_that_do_not_fit_the_budget_get_503_before_a_byte_is_read(guarded: Server) -> None:
    large = 3 * MiB  # over an eighth of the budget: large bodies share half of it (4 MiB)
    holder = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    try:
        holder.sendall(upload_head("/classify", large) + b"x" * 1024)  # admitted, then stalls
        time.sleep(0.5)
        # a second large body does not fit beside it: refused on its head, its connection closed
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
            sock.sendall(upload_head("/classify", large))
            refused = read_answer(sock, started, 10)
        assert refused.status == 503 and refused.closed and refused.seconds < 2, refused
        assert b"retry-after: 1" in refused.head.lower() and "overloaded" in refused.json()["error"]
        # ordinary photos still find room
        assert [guarded.post("/classify", jpeg_bytes(i), model="tiny_cnn").status_code for i in range(5)] == [200] * 5
        cancelled = guarded.metric("backbones_requests_total", endpoint="classify", outcome="cancelled")
        errors = guarded.metric("backbones_requests_total", outcome="error")
    finally:
        holder.close()  # the client leaves mid-upload: its room is freed, and it is not an error
    deadline = time.monotonic() + 10
    while guarded.metric("backbones_requests_total", endpoint="classify", outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the abandoned upload was not counted as cancelled"
        time.sleep(0.2)
    assert guarded.metric("backbones_requests_total", outcome="error") == errors
    # with the room free again, a large body is read whole (and its junk image refused as such)
    body = image_upload(b"\x89junk" * (large // 5 - 100))
    answer = raw_request(guarded.port, upload_head("/classify", len(body)) + body, timeout=30)
    assert answer.status == 400 and "image" in answer.json()["error"], answer


def test_a_crowd_of_large_uploads_keeps_memory_bounded(guarded: Server) -> None:
    """30 clients streaming 3.5 MiB bodies at once: each is read or refused at once, the worker's
    memory grows by a bounded amount (unbounded: ~30 x 3.5 MiB x the copies made), no worker dies."""
    pid = guarded.workers()[0].pid
    body = image_upload(b"\x89junk" * int(3.5 * MiB / 5))
    request = upload_head("/embed", len(body)) + body
    healthy(guarded)
    idle = guarded.rss_bytes()
    peak = idle
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, guarded.rss_bytes())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(30) as pool:
            statuses = [a.status for a in pool.map(lambda _: raw_request(guarded.port, request, timeout=60), range(90))]
    finally:
        done.set()
        watcher.join()
    print(f"statuses {sorted(set(map(str, statuses)))}, RSS idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
    assert set(statuses) <= {400, 503} and 400 in statuses and 503 in statuses, statuses
    assert peak - idle < 64 * MiB, (idle, peak)
    assert [p.pid for p in guarded.workers()] == [pid]
    healthy(guarded)


def test_a_chunked_body_is_held_to_the_limit_as_it_arrives(guarded: Server) -> None:
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM_TYPE}\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * MiB
    data = head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    answer = raw_request(guarded.port, data, timeout=30)
    assert answer.status == 413 and answer.closed, answer
    small = form_body([("image", jpeg_bytes(2), "a.jpg"), ("model", b"tiny_cnn", None)])
    data = head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
    assert raw_request(guarded.port, data, timeout=30).status == 200


# -- what monitoring sees ---------------------------------------------------------------------------


def metrics_lines(server: Server) -> int:
    return len(httpx.get(server.url + "/metrics", timeout=30).text.splitlines())


def test_a_path_scan_adds_no_metric_series(guarded: Server) -> None:
    rng = np.random.default_rng(7)
    alphabet = list(string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@")
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    near_misses = [
        "/classify/x",
        "/models/tiny_cnn",
        "/livez/",
        "/v2/models/nope/infer",
        "/metrics2",
        "/docs.json/x",
        "/.env",
    ]
    with httpx.Client(base_url=guarded.url, timeout=30) as client:

        def scan(i: int, path: str | None = None, method: str | None = None) -> None:
            random_path = "/" + "".join(rng.choice(alphabet, rng.integers(1, 40)))
            path = path or (near_misses[i % 50] if i % 50 < len(near_misses) else random_path)
            query = "?" + "".join(rng.choice(alphabet, 8)) if i % 3 == 0 else ""
            r = client.request(method or methods[i % len(methods)], path.replace("%", "%25") + query)
            assert r.status_code in (404, 405) or (r.status_code == 307 and path.endswith("/")), (path, r.status_code)
            if r.status_code == 404 and r.request.method != "HEAD":
                # a route that exists for another model (the Open Inference Protocol's) names it
                expected = "model 'nope' is not served here" if path.startswith("/v2/models/nope") else "not found"
                assert r.json()["error"].startswith(expected), (path, r.text)

        # warm-up: each route template and method has its series from here on (a route that exists,
        # such as the protocol's /v2/models/{model}/infer, is labelled by its template: bounded)
        for i, (path, method) in enumerate((p, m) for p in [*near_misses, "/x"] for m in methods):
            scan(i, path, method)
        before = metrics_lines(guarded)
        for i in range(300):
            scan(i)
    after = metrics_lines(guarded)
    assert after - before <= 10, (before, after)


def test_nan_in_a_models_output_is_a_clear_error_counted_as_one(guarded: Server) -> None:
    errors = guarded.metric("backbones_requests_total", endpoint="classify", model="nanhead", outcome="error")
    r = guarded.post("/classify", solid_jpeg(0), model="nanhead")
    assert r.status_code == 500, r.text
    assert "nanhead:" in r.json()["error"] and "non-finite output (NaN or Inf)" in r.json()["error"]
    after = guarded.metric("backbones_requests_total", endpoint="classify", model="nanhead", outcome="error")
    assert after == errors + 1
    assert guarded.post("/classify", solid_jpeg(255), model="nanhead").status_code == 200  # finite there
    assert guarded.post("/embed", solid_jpeg(0), model="nanhead").status_code == 200  # its features are finite
    assert "produced NaN or Inf" in guarded.log.read_text() and "Traceback" not in guarded.log.read_text()


# -- nothing leaked -------------------------------------------------------------------------------------


def strings_in(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from strings_in(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from strings_in(v)


def assert_nothing_leaked(where: str, doc: Any, secrets: list[str]) -> None:
    for text in strings_in(doc):
        for secret in secrets:
            assert secret not in text, (where, secret, text)
        for marker in ("Traceback", 'File "', "/tmp/", "/home/", "/root/", "\\Users\\"):
            assert marker not in text, (where, marker, text)


def test_no_json_body_carries_a_path_a_host_name_or_stack_text(guarded: Server) -> None:
    home = str(guarded.registry.home)
    secrets = [home, str(Path(home).parent), str(Path.home()), "private-data", "trainer-7", "safetensors"]
    if len(socket.gethostname()) >= 6:
        secrets.append(socket.gethostname())
    # the failed load's error, as the log has it, names a path: /models, /readyz and errors must not
    assert f"{home}/models/broken/" in guarded.log.read_text()
    bodies: dict[str, Any] = {}
    for path in ("/models", "/readyz", "/livez", "/docs.json"):
        r = httpx.get(guarded.url + path, timeout=30)
        if r.headers.get("content-type", "").startswith("application/json"):
            bodies[f"GET {path} {r.status_code}"] = r.json()
    models = {m["name"]: m for m in bodies["GET /models 200"]["models"]}
    assert models["broken"]["last_error"].endswith("model.yaml is unreadable ([Errno 21] Is a directory: '<path>')")
    assert set(models["nanhead"]["spec"]) == {
        "name",
        "version",
        "created_at",
        "labels",
        "num_classes",
        "preprocess",
        "feature_dim",
        "precision",
    }
    assert "broken" in bodies["GET /readyz 503"]["models"]
    requests = {
        "not loaded": dict(image=jpeg_bytes(0), model="broken"),
        "undecodable": dict(image=b"not an image"),
        "unknown model": dict(image=jpeg_bytes(0), model="../../etc/passwd"),
        "bad top_k": dict(image=jpeg_bytes(0), top_k="x" * 500),
        "nan": dict(image=solid_jpeg(0), model="nanhead"),
        "too large": dict(image=b"\xff" * (MAX_REQUEST + 1)),
    }
    for case, kwargs in requests.items():
        image = kwargs.pop("image")
        r = guarded.post("/classify", image, **kwargs)  # type: ignore[arg-type]
        assert r.status_code >= 400, case
        bodies[f"POST /classify {case} {r.status_code}"] = r.json()
    for case, data in MALFORMED.items():
        answer = raw_request(guarded.port, data, timeout=HEADER_TIMEOUT + 5)
        if answer.status is not None:
            bodies[f"raw {case} {answer.status}"] = answer.json()
    bodies["GET /nope"] = httpx.get(guarded.url + "/nope").json()
    bodies["GET /classify"] = httpx.get(guarded.url + "/classify").json()
    assert len(bodies) >= 20
    for where, doc in bodies.items():
        assert_nothing_leaked(where, doc, secrets)
    assert "model.yaml is unreadable" in bodies["POST /classify not loaded 503"]["error"]
    print(json.dumps({k: v for k, v in bodies.items() if k != "GET /docs.json 200"}, indent=1)[:4000])

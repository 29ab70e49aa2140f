"""Start and stop the real ``backbones serve`` (BentoML) on a free local port, for the service tests;
and what those tests send: multipart bodies as clients write them, ASGI calls into the app.

The server runs in a session of its own (``start_new_session``): the process that ``start_server``
returns is BentoML's arbiter (``backbones serve`` execs it), its children are the worker processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from models import Registry

from .conftest import ROOT

BOUNDARY = "b0undary-x1"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form_body(
    parts: list[tuple[str, bytes, str | None]], boundary: str = BOUNDARY, *, closing: bytes = b"--\r\n"
) -> bytes:
    """A multipart body as curl and requests write it: (name, content, filename or None) per part."""
    out = b""
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}".encode() + closing


def image_upload(image: bytes, **fields: str) -> bytes:
    """The body of an image request: text ``fields``, then the file field ``image``."""
    return form_body([*((k, v.encode(), None) for k, v in fields.items()), ("image", image, "a.jpg")])


async def asgi_call(
    app: Callable[..., Awaitable[None]], method: str, path: str, body: bytes = b"", ctype: str = FORM_TYPE
) -> tuple[int, bytes]:
    """One HTTP request straight into an ASGI app: the status and the body of its answer."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``predicate()``'s first truthy value, asked every 0.1 s for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    registry: Registry
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def post(self, route: str, image: bytes | None = None, timeout: float = 60, **fields: str) -> httpx.Response:
        files = {"image": ("upload", image, "application/octet-stream")} if image is not None else None
        return httpx.post(self.url + route, files=files, data=fields, timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def workers(self) -> list[psutil.Process]:
        """The live worker processes (the arbiter's children)."""
        try:
            return [p for p in psutil.Process(self.proc.pid).children() if p.is_running()]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        """Resident memory of the arbiter and its workers together."""
        total = 0
        for p in [psutil.Process(self.proc.pid), *self.workers()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total


def start_server(
    home: Path, refs: list[str], log: Path, *, wait_for: str = "/readyz", timeout: float = 180, **env: str
) -> Server:
    """Start ``backbones serve`` and return once ``wait_for`` answers 200.

    Tests get a drain delay of 0 (a stop takes no extra seconds) unless they set one in ``env``."""
    port = free_port()
    args = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    for ref in refs:
        args += ["--model", ref]
    environ = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "BACKBONES_SWAP_POLL_SECONDS": "0.2",
        "BACKBONES_DRAIN_DELAY_SECONDS": "0",
        **env,
    }
    proc = subprocess.Popen(
        args, cwd=ROOT, env=environ, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + wait_for, timeout=2).status_code == 200:
                return Server(url, Registry(home), proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"server not ready in time: {log.read_text()[-3000:]}")


def stop_server(server: Server, timeout: float = 60) -> None:
    """SIGTERM to the whole session (as a terminal's Ctrl+C would), SIGKILL if it overstays."""
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)


@dataclass
class RawAnswer:
    """What a server sent back on a raw connection: the status (None: nothing before it closed or
    the wait ended), the head, the body, and whether the server closed the connection."""

    status: int | None
    head: bytes
    body: bytes
    closed: bool
    seconds: float

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def read_answer(sock: socket.socket, started: float, timeout: float) -> RawAnswer:
    """Read from ``sock`` until the server closes it or ``timeout`` seconds have passed since
    ``started``; once a whole response (by its Content-Length) has come, wait at most
    ``CLOSE_GRACE`` more seconds for the close."""
    data, closed, deadline = b"", False, started + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset: the server closed with unread data
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        if _complete(data):
            deadline = min(deadline, time.monotonic() + CLOSE_GRACE)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else None
    return RawAnswer(status, head, body, closed, time.monotonic() - started)


CLOSE_GRACE = 1.0


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if sep else []:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def raw_request(port: int, data: bytes, *, timeout: float = 10) -> RawAnswer:
    """Send ``data`` as it is on a new connection to 127.0.0.1:``port`` and read the answer."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before all is sent
            sock.sendall(data)
        return read_answer(sock, started, timeout)


def upload_head(route: str, length: int, content_type: str = FORM_TYPE, **headers: str) -> bytes:
    """The request line and headers of a POST whose body of ``length`` bytes follows."""
    lines = [f"POST {route} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()

"""A small HTTP/1.1 load generator for multipart image uploads (keep-alive, asyncio, raw
sockets): cheap enough per request that it takes little of the cores the server needs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

BOUNDARY = "backbones-bench-boundary"


def multipart_request(host: str, path: str, image: bytes, fields: dict[str, str] | None = None) -> bytes:
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def with_header(request: bytes, name: str, value: str) -> bytes:
    """``request`` with one more header line after its request line (e.g. ``Authorization``)."""
    line, _, rest = request.partition(b"\r\n")
    return line + f"\r\n{name}: {value}".encode() + b"\r\n" + rest


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def non_2xx(self) -> int:
        return sum(self.statuses.values()) - self.ok

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


async def _client(
    host: str, port: int, requests: list[bytes], offset: int, deadline: float, result: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            status_line = await reader.readline()
            if not status_line:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            status = int(status_line.split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                if key.lower() == "content-length":
                    length = int(value)
                elif key.lower() == "connection" and "close" in value.lower():
                    close = True
            await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - start)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def run_load(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> LoadResult:
    """``clients`` connections, each sending one request after another for ``seconds``."""

    async def main() -> LoadResult:
        result = LoadResult(clients=clients, seconds=seconds)
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(_client(host, port, requests, k * 7, deadline, result) for k in range(clients)))
        result.seconds = time.perf_counter() - start
        return result

    return asyncio.run(main())

"""Limits on connections and request heads, below the ASGI app, in each worker's HTTP server.

BentoML starts uvicorn with no way to pass it options, and uvicorn (with httptools) puts no
bound on a request line or its headers, never times out a connection that has not finished its
headers (its keep-alive timeout only covers idle connections between requests, and any byte
resets it), and limits connections only with a plain-text 503. :func:`install` runs in each
worker's start-up hook, after uvicorn has loaded its configuration and before it opens its
listener, and replaces the protocol class uvicorn builds connections with by
:class:`GuardedProtocol`:

- a request's line and headers must arrive within ``header_timeout_seconds`` of its first byte
  (a new connection: of its opening), else 408 and the connection is closed (a connection that
  sent nothing is just closed);
- at most ``max_header_bytes`` of line and headers, and ``max_headers`` header lines: 431;
- a request on a connection beyond ``max_connections`` gets 503 with ``Retry-After``;
- what the HTTP parser refuses (bad request lines, conflicting ``Content-Length`` and
  ``Transfer-Encoding``, bad chunk sizes) gets uvicorn's 400, as JSON;

each with ``connection: close``. The protocol also keeps the worker's count of connections on the
board the workers share (service/balance.py), and closes a keep-alive connection after its
request while this worker holds more than its share. It also puts :class:`service.paths.RouteLabels` in front of the
whole app, ahead of BentoML's metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from models import Settings
from models.runtime import serving_plan

from .balance import ConnectionBoard
from .drain import Receive, Scope, Send
from .limits import RETRY_AFTER_BUSY_SECONDS
from .paths import RouteLabels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransportLimits:
    header_timeout_seconds: float
    max_header_bytes: int
    max_headers: int
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> TransportLimits:
        return cls(
            header_timeout_seconds=settings.header_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_connections=settings.max_connections,
        )


def refusal_bytes(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body that closes its connection."""
    body = json.dumps({"error": message}).encode()
    head = [STATUS_LINE[status]]
    for name, value in {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **(headers or {}),
    }.items():
        head.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join([*head, b"\r\n", body])


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI answer to a request on a connection beyond the limit."""
    body = json.dumps({"error": "overloaded: too many open connections"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_BUSY_SECONDS).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


BAD_REQUEST = (
    "invalid HTTP request: a malformed request line or header, conflicting Content-Length and "
    "Transfer-Encoding, or a bad chunk"
)


class HeadRefusedError(Exception):
    """Raised inside the HTTP parser's callbacks to stop it; the protocol answers with the refusal."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    limits: ClassVar[TransportLimits | None] = None  # set by install()
    board: ClassVar[ConnectionBoard | None] = None  # set by install() where there are workers to balance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.limits is not None, "install() sets the limits before the server takes connections"
        self.bounds: TransportLimits = self.limits
        self.in_head = True  # between the end of a request (or the connection's start) and its headers
        self.head_bytes = 0  # bytes received since the head began (it may still be in the parser)
        self.head_size = 0  # of which parsed: the URL, header names and values
        self.header_lines = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.refusal: tuple[int, str] | None = None

    # -- the head's clock ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.bounds.header_timeout_seconds, self._head_overdue)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_overdue(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head waits its turn
            self._arm()
            return
        if self.head_bytes:
            seconds = self.bounds.header_timeout_seconds
            self.refuse(408, f"request headers not received within {seconds:g} s")
        else:  # nothing sent: nobody to answer
            self.transport.close()

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close the connection."""
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(refusal_bytes(status, message))
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        if self.board is not None:
            self.board.publish(len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        if self.board is not None:
            self.board.publish(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
            self._arm()
        super().data_received(data)
        if self.in_head and self.head_bytes > self.bounds.max_header_bytes:
            self.refuse(431, f"request line and headers exceed {self.bounds.max_header_bytes:,} bytes")

    def send_400_response(self, msg: str) -> None:
        """The parser refused the request (or a callback stopped it): a JSON answer, then close."""
        status, message = self.refusal or (400, BAD_REQUEST)
        self.refuse(status, message)

    # -- httptools callbacks ------------------------------------------------------------------

    def _grow_head(self, size: int, lines: int = 0) -> None:
        self.head_size += size
        self.header_lines += lines
        if self.head_size > self.bounds.max_header_bytes:
            self.refusal = (431, f"request line and headers exceed {self.bounds.max_header_bytes:,} bytes")
        elif self.header_lines > self.bounds.max_headers:
            self.refusal = (431, f"more than {self.bounds.max_headers} header lines")
        else:
            return
        raise HeadRefusedError

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_size = self.header_lines = 0

    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value), 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head, self.head_bytes = False, 0
        self._disarm()
        if len(self.connections) > self.bounds.max_connections:
            self.app = too_many_connections  # this connection answers 503 once, then closes
        super().on_headers_complete()
        if self.board is not None and self.cycle is not None and self.board.over_share(len(self.connections)):
            self.cycle.keep_alive = False  # answered, then closed: the client reconnects, most often elsewhere

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head = True


def running_server() -> Any:
    """The uvicorn server of this worker (its signal handler is a method of it), or None."""
    server = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return server if hasattr(server, "config") and hasattr(server, "server_state") else None


def install(settings: Settings, worker_index: int | None = None) -> bool:
    """Put the limits in place in this worker's uvicorn server; call from a start-up hook (the
    listener opens after it). ``worker_index``: BentoML's number of this worker (from 1), for the
    connection board. False, with a warning, where there is no uvicorn server to change."""
    server = running_server()
    config = getattr(server, "config", None)
    if config is None:
        log.warning("no uvicorn server in this process: connection and header limits are not in place")
        return False
    base = config.http_protocol_class
    if not (isinstance(base, type) and issubclass(base, HttpToolsProtocol)):
        log.warning("uvicorn runs %s, not httptools: connection and header limits are not in place", base)
    else:
        GuardedProtocol.limits = TransportLimits.of(settings)
        GuardedProtocol.board = ConnectionBoard.for_worker(serving_plan(settings).workers, worker_index)
        config.http_protocol_class = GuardedProtocol
    if not isinstance(config.loaded_app, RouteLabels):
        config.loaded_app = RouteLabels(config.loaded_app, routes=config.app.routes)
    return True


def uninstall() -> None:
    """Give up this worker's place on the connection board (a shutdown hook)."""
    board, GuardedProtocol.board = GuardedProtocol.board, None
    if board is not None:
        board.close()

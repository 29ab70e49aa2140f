"""Shutting a worker down without failing a request, and readiness that says why it is not ready.

A worker gets SIGTERM from BentoML's arbiter (circus), which gets it from Kubernetes or a terminal
and waits for its workers without a time limit of its own. Left alone, uvicorn would stop
listening at once and a load balancer still routing here would see refused connections.
:class:`Drain` takes SIGTERM over from uvicorn in each worker:

1. ``/readyz`` answers 503 ``{"ready": false, "reason": "draining"}`` at once, while requests are
   still served for ``drain_delay_seconds``, so load balancers take the pod out of rotation first;
2. then uvicorn gets the signal: it stops listening and lets in-flight requests finish, for at
   most ``drain_seconds`` (uvicorn's graceful-shutdown timeout: later ones are cancelled);
3. the models' batchers stop and the process exits. Should anything hang past
   ``drain_delay_seconds + drain_seconds + EXIT_MARGIN_SECONDS`` (a stuck ONNX Runtime call), a
   watchdog ends the process, so it always leaves within its pod's grace period.

A second SIGTERM (the arbiter passes its own on, so a worker may get two) changes nothing. Ctrl+C in a
terminal sends SIGINT, which is not drained: uvicorn stops at once.

:class:`ReadinessMiddleware` answers ``/readyz`` with JSON reasons while the worker is draining or
a served model is not loaded (BentoML's own probe only says 503); ``/livez`` stays BentoML's: a
worker that is loading, retrying a model or draining is alive. A worker that serves every model
but cannot load a newer version (the registry does not answer, the new version failed) stays
ready: its loaded versions still answer; BentoML's 200 then carries the reasons in JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger(__name__)

# The watchdog's allowance for the steps after the drain (lifespan shutdown, interpreter exit);
# deploy/ adds its own margin on top of the drain settings, so this must stay well below it.
EXIT_MARGIN_SECONDS = 2.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
SignalHandler = Callable[[int, FrameType | None], Any]


class Readiness(Protocol):
    """What the probe asks the model pool."""

    @property
    def ready(self) -> bool: ...

    def not_ready_reasons(self) -> dict[str, str]: ...

    def update_errors(self) -> dict[str, str]: ...


class Drain:
    """The SIGTERM sequence of one worker process (see the module docstring)."""

    def __init__(self, *, delay_seconds: float, drain_seconds: float) -> None:
        self.delay_seconds = delay_seconds
        self.drain_seconds = drain_seconds
        self.draining = False
        self.since: float | None = None  # time.monotonic() of the first SIGTERM
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server_exit: SignalHandler | None = None

    def install(self) -> None:
        """Take SIGTERM over from the server; call from the worker's event loop (its main thread)
        once the server has installed its own handlers (a start-up hook runs after that)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM keeps its default handling (no drain delay)")
            return
        self._loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        self._server_exit = previous if callable(previous) else None
        # uvicorn's handler is a bound method of its Server: bound its wait for in-flight requests
        config = getattr(getattr(previous, "__self__", None), "config", None)
        if config is not None and hasattr(config, "timeout_graceful_shutdown"):
            config.timeout_graceful_shutdown = self.drain_seconds
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.draining:
            return
        self.draining, self.since = True, time.monotonic()
        deadline = self.delay_seconds + self.drain_seconds + EXIT_MARGIN_SECONDS
        watchdog = threading.Timer(deadline, self._overstayed, args=(deadline,))
        watchdog.daemon = True
        watchdog.start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.call_later, self.delay_seconds, self._stop_serving)
        log.warning(
            "SIGTERM: draining; /readyz answers 503 for %.1f s while requests are still served, then "
            "in-flight requests get up to %.1f s",
            self.delay_seconds,
            self.drain_seconds,
        )

    def _stop_serving(self) -> None:
        log.warning("drain delay over: no new connections; waiting for in-flight requests")
        if self._server_exit is not None:
            self._server_exit(signal.SIGTERM, None)
        else:  # no server handler to hand over to: the default action
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    @staticmethod
    def _overstayed(seconds: float) -> None:
        log.error("still running %.1f s after SIGTERM: exiting now", seconds)
        os._exit(1)


class ReadinessMiddleware:
    """``GET /readyz``: 503 with a JSON reason while draining or while a model is not loaded; the
    request goes on to BentoML's probe (200) otherwise, whose body names what a loaded model could
    not update to, if anything."""

    def __init__(self, app: ASGIApp, *, pool: Readiness, drain: Drain, path: str = "/readyz") -> None:
        self.app = app
        self.pool = pool
        self.drain = drain
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body: dict[str, Any] = {"ready": False, "reason": "draining"}
        elif not self.pool.ready:
            body = {"ready": False, "reason": "models not loaded", "models": self.pool.not_ready_reasons()}
        elif errors := self.pool.update_errors():
            await self.app(scope, receive, _json_body(send, {"reason": "serving loaded versions", "models": errors}))
            return
        else:
            await self.app(scope, receive, send)
            return
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", b"5"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _json_body(send: Send, doc: dict[str, Any]) -> Send:
    """``send`` with the response's body replaced by ``{"ready": <status is 200>, **doc}`` as
    JSON; the status stays the app's."""
    payload = b""

    async def replaced(message: Message) -> None:
        nonlocal payload
        if message["type"] == "http.response.start":
            payload = json.dumps({"ready": message["status"] == 200, **doc}).encode()
            kept = [
                (k, v) for k, v in message.get("headers", []) if k.lower() not in (b"content-type", b"content-length")
            ]
            kept += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            message = {**message, "headers": kept}
        elif message["type"] == "http.response.body":
            if message.get("more_body"):
                return  # the app's own body, in pieces: replaced by the last one
            message = {**message, "body": payload}
        await send(message)

    return replaced

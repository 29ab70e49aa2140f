"""A real S3 API server for the tests: moto's standalone server, on a free local port.

Run as ``python -m tests.s3_server``: it prints the port it listens on, then serves until killed.
Requests are answered one at a time. Moto checks a write's condition (``If-Match``,
``If-None-Match: *``) and then writes, in two steps; AWS S3, GCS and MinIO do both atomically.
Serializing requests gives the tests a server with the store's guarantee, while clients still
race each other between their requests (which is what compare-and-swap has to survive).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def serialized(app: WSGIApp) -> WSGIApp:
    lock = threading.Lock()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    return handle


def main() -> None:
    app = serialized(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

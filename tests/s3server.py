"""A real S3 API for the tests and the benchmarks: moto's standalone server (HTTP, the same
requests AWS gets; not a mock of the client) in a process of its own on a free 127.0.0.1 port,
with fake credentials and ``AWS_ENDPOINT_URL`` in the environment, so that every client made
afterwards talks to it the standard way: s3fs and botocore here, the CLI in subprocesses, decode
workers, Ray workers and servers.

    pytest_plugins = ("tests.s3server",)  # the session fixture ``s3``

    def test_x(s3: S3Server) -> None:
        s3.fs.pipe_file("bucket/key", b"...")

:func:`serve` is the same without pytest (a benchmark, or a store of a test's own that it stops).
``python -m tests.s3server`` runs the server alone: it prints the port it listens on, then serves
until killed.

Every request goes to moto's S3 backend (moto otherwise looks the service up among all of its
backends on every request, most of its CPU time per small GET). Requests are answered one at a
time: moto checks a write's condition (``If-Match``, ``If-None-Match: *``) and then writes, in two
steps, where AWS S3, GCS and MinIO do both atomically; serialized, the server has the store's
guarantee while clients still race each other between their requests (which is what
compare-and-swap has to survive). ``serialized=False`` (``--parallel``) answers requests
concurrently, for throughput benchmarks that write no conditional object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Recognisable on purpose: tests assert that neither ever appears in a file or a message.
ACCESS_KEY = "AKIABACKBONESTEST000"
SECRET_KEY = "backbones/test/secret/never/printed"
REGION = "us-east-1"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class S3Server:
    """A running server: its endpoint, the environment a client needs, a file system on it, and
    its process (terminate it to take the store away)."""

    endpoint: str
    process: subprocess.Popen[str]
    env: dict[str, str] = field(default_factory=dict)
    fs: Any = None

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def bucket(self, name: str, *, versioned: bool = False) -> str:
        """Create bucket ``name`` (if new); returns ``s3://name``."""
        if not self.fs.exists(name):
            self.fs.mkdir(name)
        if versioned:
            self.fs.call_s3("put_bucket_versioning", Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return f"s3://{name}"

    def put(self, url: str, data: bytes) -> str:
        self.fs.pipe_file(url, data)
        return url

    def keys(self, url: str) -> list[str]:
        """Every object under ``url``, as URLs, sorted."""
        return sorted("s3://" + k for k in self.fs.find(url))

    def versions(self, bucket: str, prefix: str) -> dict[str, int]:
        """How many versions each key under ``prefix`` has (a versioned bucket)."""
        found: dict[str, int] = {}
        pages = self.fs.call_s3("list_object_versions", Bucket=bucket, Prefix=prefix)
        for v in pages.get("Versions", []):
            found[v["Key"]] = found.get(v["Key"], 0) + 1
        return found


def _s3_app(serialized: bool) -> WSGIApp:
    """moto's application with every request routed to its S3 backend, one request at a time
    when ``serialized``."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class S3Only(DomainDispatcherApplication):  # type: ignore[misc]
        def get_application(self, environ: dict[str, Any]) -> Any:
            with self.lock:
                if "s3" not in self.app_instances:
                    self.app_instances["s3"] = self.create_app("s3")
                return self.app_instances["s3"]

    app: WSGIApp = S3Only(create_backend_app)
    if not serialized:
        return app
    lock = threading.Lock()

    def one_at_a_time(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            return list(app(environ, start_response))

    return one_at_a_time


def main(argv: Sequence[str] | None = None) -> None:
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description="moto's S3 server on a free local port (prints the port)")
    parser.add_argument("--parallel", action="store_true", help="answer requests concurrently")
    args = parser.parse_args(argv)
    server = make_server("127.0.0.1", 0, _s3_app(not args.parallel), threaded=True, request_handler=MotoRequestHandler)
    port = server.server_address[1]
    os.environ["MOTO_PORT"] = str(port)  # where moto's responses say the server is
    print(port, flush=True)
    server.serve_forever()


@contextlib.contextmanager
def serve(*, serialized: bool = True) -> Iterator[S3Server]:
    """Start the server, point the AWS variables at it (restored afterwards), stop it at the end."""
    import s3fs

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.s3server", *([] if serialized else ["--parallel"])],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,  # no profile of the machine's user gets in the way
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    try:
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError("the moto server did not start")
        env["AWS_ENDPOINT_URL"] = endpoint = f"http://127.0.0.1:{port}"
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(k, None)
        os.environ.update(env)
        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False
        )
        yield S3Server(endpoint, proc, env, fs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3 server for the session (make a bucket of your own: ``s3.bucket(name)``)."""
    with serve() as server:
        yield server


if __name__ == "__main__":
    main()

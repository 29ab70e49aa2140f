"""A real S3 API for the tests: moto's standalone server on a free 127.0.0.1 port (HTTP, the
same requests AWS gets; not a mock of the client), with fake credentials and ``AWS_ENDPOINT_URL``
in the environment, so that every client made afterwards talks to it the standard way: s3fs and
botocore here, the CLI in subprocesses, decode workers and Ray workers.

    pytest_plugins = ("tests.s3server",)  # the session fixture ``s3``

    def test_x(s3: S3Server) -> None:
        s3.fs.pipe_file("bucket/key", b"...")

:func:`serve` is the same without pytest; ``serve(own_process=True)`` runs the server in a
process of its own (benchmarks: its requests then do not take this process's GIL), with moto's
application routing every request to its S3 backend (moto otherwise looks the service up among
all of its backends on every request, most of its CPU time per small GET).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Recognisable on purpose: tests assert that neither ever appears in a file or a message.
ACCESS_KEY = "AKIABACKBONESTEST000"
SECRET_KEY = "backbones/test/secret/never/printed"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running server: its endpoint, the environment a client needs, and a file system on it."""

    endpoint: str
    env: dict[str, str] = field(default_factory=dict)
    fs: Any = None
    process: subprocess.Popen[bytes] | None = None  # the server's, with own_process=True

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


# moto's standalone server (``python -m moto.server``) with the S3 backend for every request
_S3_SERVER = """
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

class S3Only(DomainDispatcherApplication):
    def get_application(self, environ):
        with self.lock:
            if "s3" not in self.app_instances:
                self.app_instances["s3"] = self.create_app("s3")
            return self.app_instances["s3"]

run_simple("127.0.0.1", int(sys.argv[1]), S3Only(create_backend_app), threaded=True, request_handler=MotoRequestHandler)
"""


@contextlib.contextmanager
def _moto(port: int, own_process: bool) -> Iterator[subprocess.Popen[bytes] | None]:
    if not own_process:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield None
        finally:
            server.stop()
        return
    env = {**os.environ, "MOTO_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _S3_SERVER, str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the moto server did not start")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def serve(*, own_process: bool = False) -> Iterator[S3Server]:
    """Start the server, point the AWS variables at it (restored afterwards), stop it at the end."""
    import s3fs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        with _moto(port, own_process) as process:
            fs = s3fs.S3FileSystem(
                key=ACCESS_KEY,
                secret=SECRET_KEY,
                endpoint_url=endpoint,
                skip_instance_cache=True,
                use_listings_cache=False,
            )
            yield S3Server(endpoint, env, fs, process)
    finally:
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

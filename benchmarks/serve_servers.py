"""The servers bench_serve.py compares, each a process group it can start, pause and resume: the
server being measured has the cores to itself while the others are stopped (SIGSTOP), and every
server sees the same photos in the same order."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from loadgen import multipart_request
from oip_load import infer_request

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """One server under test: how to start it, when it is ready, and the request for a photo."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    request: Callable[[bytes], bytes]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    start: Callable[[int], subprocess.Popen[bytes]] | None = None  # instead of ``command``

    def launch(self, log: Path, timeout: float = 600) -> None:
        if self.start is not None:
            self.proc = self.start(self.port)
        else:
            with open(log, "wb") as out:
                self.proc = subprocess.Popen(
                    [*self.command, "--port", str(self.port)],
                    cwd=ROOT,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode} (log: {log})")
            try:
                if httpx.get(f"http://{HOST}:{self.port}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # fine enough for bench_cold_start's seconds to ready
        raise SystemExit(f"{self.name} not ready after {timeout} s (log: {log})")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        time.sleep(0.5)  # let its threads and timers catch up before the clock starts

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # what it started lives on in its process group (Triton's server and model stubs outlive
        # PyTriton's Python process): gone within a few seconds, or killed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def backbones(refs: list[str], env: dict[str, str], model: str | None = None) -> ServerProcess:
    """`backbones serve` with its default layout (the environment may set BACKBONES_* settings)."""
    command = [sys.executable, "-m", "cli", "serve", "--host", HOST]
    for ref in refs:
        command += ["--model", ref]
    fields = {"model": model} if model else None
    return ServerProcess(
        "backbones serve",
        command,
        env,
        "/readyz",
        lambda photo: multipart_request(HOST, "/classify", photo, fields),
    )


def triton(version_dir: Path, env: dict[str, str], log: Path, *, instances: int) -> ServerProcess:
    """NVIDIA Triton (PyTriton) with the same graph and preprocessing in its Python model."""
    import baseline_triton

    return ServerProcess(
        f"Triton (PyTriton, {instances} instances)",
        [],
        env,
        f"/v2/models/{baseline_triton.MODEL}/ready",
        lambda photo: infer_request(HOST, baseline_triton.MODEL, [photo], column=True),
        start=lambda port: baseline_triton.start(
            version_dir, port, instances=instances, max_batch=32, queue_delay_us=2000, log=log
        ),
    )


def fastapi_torch(env: dict[str, str]) -> ServerProcess:
    return ServerProcess(
        "FastAPI + PyTorch eager",
        [sys.executable, "benchmarks/baseline_fastapi_torch.py"],
        env,
        "/readyz",
        lambda photo: multipart_request(HOST, "/classify", photo),
    )

"""Preflight: an ONNX file is loaded and run once in a separate process before it is registered
or served.

An ONNX file is a program for ONNX Runtime. One that references external data files could read
what lies beside it, one with the wrong inputs or outputs would fail on the first request, and a
malformed one can crash ONNX Runtime (a segfault takes the whole server with it). So the checks
run in a child process (models/preflight_child.py) that imports nothing from the project: a crash
(negative return code), a hang (``preflight_timeout_seconds``) or a refusal there becomes an
:class:`ArtifactError` here, and the caller stores or serves nothing.

The child hashes the bytes it checked; the result counts only for the file whose sha256 the caller
expects, and is remembered for that digest in this process so that export verification and the
registration that follows it do not start two children for one file.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .settings import Settings, get_settings
from .spec import INPUT_NAME, OUTPUT_NAMES, VersionSpec

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("preflight_child.py")


@dataclass(frozen=True)
class Expectation:
    """What a version's ``model.onnx`` must look like, from its spec."""

    crop: int
    num_classes: int
    feature_dim: int
    input: str = INPUT_NAME
    outputs: tuple[str, str] = OUTPUT_NAMES

    def to_json(self) -> str:
        doc = asdict(self)
        doc["outputs"] = list(self.outputs)
        return json.dumps(doc, sort_keys=True)


def expectation(spec: VersionSpec) -> Expectation:
    return Expectation(crop=spec.preprocess.crop, num_classes=spec.num_classes, feature_dim=spec.feature_dim)


_passed: set[tuple[str, str]] = set()  # (sha256, expectation) checked in this process


def run_child(command: list[str], timeout: float) -> dict[str, Any]:
    """Run a preflight child and read its one-line JSON verdict; a crash, a hang or no verdict is
    an :class:`ArtifactError` naming what happened."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ArtifactError(
            f"loading and running the ONNX file took longer than {timeout:g} s "
            "(preflight_timeout_seconds); it was refused"
        ) from None
    if proc.returncode < 0:
        try:
            why = signal.Signals(-proc.returncode).name
        except ValueError:
            why = f"signal {-proc.returncode}"
        raise ArtifactError(f"ONNX Runtime crashed ({why}) while loading or running the ONNX file; it was refused")
    lines = proc.stdout.strip().splitlines()
    try:
        verdict: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except ValueError:
        verdict = {}
    if proc.returncode != 0 or "ok" not in verdict:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise ArtifactError(f"the ONNX preflight process failed (exit {proc.returncode}: {tail}); the file was refused")
    return verdict


def preflight(
    path: Path,
    expect: Expectation,
    *,
    sha256: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Check ``path`` in a child process; raise :class:`ArtifactError` if it is refused.

    ``sha256``: the digest the caller will record or has recorded for the file; the bytes the child
    checked must have it. Returns the child's report (output shapes, seconds)."""
    settings = settings or get_settings()
    key = (sha256 or "", expect.to_json())
    if sha256 and key in _passed:
        return {"ok": True, "sha256": sha256, "cached": True}
    start = time.perf_counter()
    verdict = run_child(
        [sys.executable, "-I", str(CHILD), str(path), expect.to_json()], settings.preflight_timeout_seconds
    )
    if not verdict["ok"]:
        raise ArtifactError(f"{Path(path).name} was refused: {verdict.get('problem', 'no reason given')}")
    if sha256 and verdict.get("sha256") != sha256:
        raise ArtifactError(f"{Path(path).name} changed while it was being checked; it was refused")
    verdict["seconds"] = round(time.perf_counter() - start, 3)
    _passed.add((str(verdict["sha256"]), key[1]))
    log.debug("preflight of %s passed in %.2f s", path, verdict["seconds"])
    return verdict

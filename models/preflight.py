"""Preflight: an ONNX file is loaded and run once in a separate process before it is registered
or served.

An ONNX file is a program for ONNX Runtime. One that references external data files could read
what lies beside it, one with the wrong inputs or outputs would fail on the first request, and a
malformed one can crash ONNX Runtime (a segfault takes the whole server with it). So the checks
run in a child process (models/preflight_child.py) that imports nothing from the project: a crash
(negative return code), a hang (``preflight_timeout_seconds``) or a refusal there becomes an
:class:`ArtifactError` here, and the caller stores or serves nothing.

The child hashes the bytes it checked; the result counts only for the file whose sha256 the caller
expects. It runs the graph on the providers the caller will use, and on a CPU within a memory
limit. A pass is remembered for that digest, expectation, provider list and ONNX Runtime version:
in this process, and (where the caller gives a folder, as :func:`models.inference.open_version`
does with the registry's own) on disk, so that the next command using the same version does not
start a child again.
"""

from __future__ import annotations

import hashlib
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


_passed: set[str] = set()  # memo keys of the checks passed in this process

# The preflight child's address-space limit on a CPU: enough for ONNX Runtime, numpy and a few
# copies of the graph; a graph that allocates more than this to run a batch of 2 is refused.
BASE_MEMORY_LIMIT = 2 << 30
MEMORY_PER_MODEL_BYTE = 8
CPU_PROVIDER = "CPUExecutionProvider"


def memory_limit(model_bytes: int, providers: list[str]) -> int | None:
    """The child's limit; none with a GPU provider (CUDA maps far more address space than it uses)."""
    if any(p != CPU_PROVIDER for p in providers):
        return None
    return BASE_MEMORY_LIMIT + MEMORY_PER_MODEL_BYTE * model_bytes


def _memo_key(sha256: str, expect: Expectation, providers: list[str]) -> str:
    import onnxruntime as ort

    doc = json.dumps([sha256, expect.to_json(), providers, ort.__version__])
    return hashlib.sha256(doc.encode()).hexdigest()


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
    providers: list[str] | None = None,
    memo_dir: Path | None = None,
) -> dict[str, Any]:
    """Check ``path`` in a child process; raise :class:`ArtifactError` if it is refused.

    ``sha256``: the digest the caller will record or has recorded for the file; the bytes the child
    checked must have it. ``providers``: the ONNX Runtime providers the caller will run it on
    (default: the CPU). ``memo_dir``: a folder where passes are remembered across processes (a
    failure to write there is ignored: the registry may be read-only). Returns the child's report."""
    settings = settings or get_settings()
    providers = providers or [CPU_PROVIDER]
    key = _memo_key(sha256, expect, providers) if sha256 else None
    if key and (key in _passed or (memo_dir is not None and (memo_dir / key).is_file())):
        if memo_dir is not None and key in _passed:
            _remember(memo_dir, key)
        _passed.add(key)
        return {"ok": True, "sha256": sha256, "cached": True}
    start = time.perf_counter()
    options = {"providers": providers, "memory_limit": memory_limit(Path(path).stat().st_size, providers)}
    command = [sys.executable, "-I", str(CHILD), str(path), expect.to_json(), json.dumps(options)]
    verdict = run_child(command, settings.preflight_timeout_seconds)
    if not verdict["ok"]:
        raise ArtifactError(f"{Path(path).name} was refused: {verdict.get('problem', 'no reason given')}")
    if sha256 and verdict.get("sha256") != sha256:
        raise ArtifactError(f"{Path(path).name} changed while it was being checked; it was refused")
    verdict["seconds"] = round(time.perf_counter() - start, 3)
    key = _memo_key(str(verdict["sha256"]), expect, providers)
    _passed.add(key)
    if memo_dir is not None:
        _remember(memo_dir, key)
    log.debug("preflight of %s passed in %.2f s", path, verdict["seconds"])
    return verdict


def _remember(memo_dir: Path, key: str) -> None:
    from .files import write_atomic

    if (memo_dir / key).is_file():
        return
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_dir / key, b"passed\n")
    except OSError as e:
        log.debug("preflight pass not remembered in %s (%s)", memo_dir, e)

"""NVIDIA Triton as a serving baseline: the same ONNX graph and the same preprocessing as a
registered version, in a Python model bound with PyTriton (which bundles Triton's server), with
dynamic batching and several model instances. A user who wants Triton's scheduler and keeps our
decode would build exactly this.

PyTriton needs numpy < 2, so it runs in a virtual environment of its own (made with uv on first
use, under benchmarks/.triton-venv, ignored by git) that imports the project's preprocessing and
ONNX Runtime wrapper from this checkout. Its Python backend stub loads libpython: the one of the
interpreter that made the venv is put first on LD_LIBRARY_PATH (a system libpython of another
patch release makes the stub fail in multiprocessing).

    python benchmarks/baseline_triton.py --version-dir DIR --port 8000 [--instances 2]

serves until interrupted; bench_serve.py starts it with :func:`start`. Clients speak the Open
Inference Protocol (oip_load.py builds the requests: shape [1, 1], binary tensor extension, top-5
through the classification extension, as for our own v2 route).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(__file__).resolve().parent / ".triton-venv"
MODEL = "backbone"
# What the Triton environment installs (PyTriton pins numpy < 2); Pillow is the project's own
# version, so both servers decode to the same pixels.
PACKAGES = ("nvidia-pytriton>=0.7", "onnxruntime", "pydantic", "pydantic-settings")


def uv() -> list[str]:
    """The uv command, as the Makefile finds it: on PATH, else the module of the system Python."""
    found = shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


def venv_python() -> Path:
    """The Triton environment's interpreter, made on first use."""
    python = VENV / "bin" / "python"
    if not python.exists():
        import PIL

        subprocess.run([*uv(), "venv", "-q", "-p", sys.executable, str(VENV)], check=True)
        pkgs = [*PACKAGES, f"pillow=={PIL.__version__}"]
        subprocess.run([*uv(), "pip", "install", "-q", "--python", str(python), *pkgs], check=True)
    return python


def start(
    version_dir: Path, port: int, *, instances: int, max_batch: int, queue_delay_us: int, log: Path
) -> subprocess.Popen[bytes]:
    """Start the Triton baseline on ``port`` (HTTP) serving the version in ``version_dir``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LD_LIBRARY_PATH": os.pathsep.join(
            filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")])
        ),
    }
    args = [
        str(venv_python()),
        __file__,
        "--version-dir",
        str(version_dir),
        "--port",
        str(port),
        "--instances",
        str(instances),
        "--max-batch",
        str(max_batch),
        "--queue-delay-us",
        str(queue_delay_us),
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def serve(version_dir: Path, port: int, instances: int, max_batch: int, queue_delay_us: int) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from models.preprocess import ImageLoader
    from models.runtime import OnnxSession
    from models.settings import Settings
    from models.spec import VersionSpec

    spec = VersionSpec.model_validate_json((version_dir / "spec.json").read_bytes())
    loader = ImageLoader(spec.preprocess)
    threads = max(1, (os.cpu_count() or 1) // instances)

    def instance():  # type: ignore[no-untyped-def]
        session = OnnxSession(version_dir / "model.onnx", settings=Settings(providers="cpu"), threads=threads)

        @batch
        def infer(image: np.ndarray) -> dict[str, np.ndarray]:
            pixels = loader.batch([bytes(row[0]) for row in image])
            return {"logits": session.run(pixels).logits}

        return infer

    config = TritonConfig(http_port=port, grpc_port=port + 1, metrics_port=port + 2, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=[instance() for _ in range(instances)],
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(len(spec.labels),))],
            config=ModelConfig(
                max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)
            ),
            strict=True,
        )
        triton.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, required=True, help="a registered version's folder")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--instances", type=int, default=2, help="model instances (each with its own session)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher's queue delay")
    a = parser.parse_args()
    serve(a.version_dir, a.port, a.instances, a.max_batch, a.queue_delay_us)


if __name__ == "__main__":
    main()

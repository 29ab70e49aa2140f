"""Shared fixtures: a real registry in a temporary BENTOML_HOME, the tiny CNN registered like a
real model, images made by the tests, and ../shared/data where it exists."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

from models import Registry, StoredVersion
from models.samples import synthetic_image

if TYPE_CHECKING:
    from .serving import Server

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """An empty registry of its own."""
    return Registry(tmp_path / "bentoml")


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry holding one exported tiny_cnn version (shared: do not modify it)."""
    from models.export import export_catalog

    reg = Registry(tmp_path_factory.mktemp("tiny") / "bentoml")
    export_catalog("tiny_cnn", registry=reg)
    return reg


@pytest.fixture(scope="session")
def tiny_version(tiny_registry: Registry) -> StoredVersion:
    return tiny_registry.get("tiny_cnn")


@pytest.fixture(scope="session")
def lite0_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry holding the bundled EfficientNet-Lite0, exported once for the session."""
    from models.export import export_catalog

    reg = Registry(tmp_path_factory.mktemp("lite0") / "bentoml")
    export_catalog("efficientnet_lite0", registry=reg)
    return reg


def jpeg_bytes(i: int = 0, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    synthetic_image(i, size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def image_files(tmp_path: Path) -> list[Path]:
    """Three synthetic JPEG photos on disk."""
    paths = []
    for i in range(3):
        p = tmp_path / f"photo{i}.jpg"
        p.write_bytes(jpeg_bytes(i))
        paths.append(p)
    return paths


def shared_data(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"../shared/data/{sub} is absent (real photos for this test live there)")
    return path


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``backbones`` CLI in a subprocess against a registry in ``tmp_path``."""
    home = tmp_path / "cli-bentoml"

    def run(
        *args: str, home_dir: Path | None = None, extra_env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BENTOML_HOME": str(home_dir or home), "BENTOML_DO_NOT_TRACK": "true", **(extra_env or {})}
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )

    run.home = home  # type: ignore[attr-defined]
    return run


def make_image(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    return synthetic_image(3, size).convert(mode)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real ``backbones serve`` with two workers serving the tiny CNN from a registry of its
    own (shared by the session: tests may kill a worker, which the server replaces). Requests time
    out after 10 s (504)."""
    from models.export import export_catalog

    from .serving import start_server, stop_server

    home = tmp_path_factory.mktemp("tiny-serve") / "bentoml"
    export_catalog("tiny_cnn", registry=Registry(home))
    server = start_server(
        home,
        ["tiny_cnn"],
        tmp_path_factory.mktemp("tiny-serve-log") / "server.log",
        BACKBONES_WORKERS="2",
        BACKBONES_REQUEST_TIMEOUT_SECONDS="10",
    )
    yield server
    stop_server(server)

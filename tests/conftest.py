"""Shared fixtures: a real registry in a temporary BENTOML_HOME, the tiny CNN registered like a
real model, images made by the tests, and ../shared/data where it exists; and the test suite's own
knobs (:class:`TestHooks`), which the product's settings do not carry."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import Registry, Settings, StoredVersion
from models.samples import synthetic_image

if TYPE_CHECKING:
    from .serving import Server

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


class TestHooks(BaseSettings):
    """Settings of the test suite alone, read from the environment with the product's prefix."""

    __test__ = False  # a settings class, not a class of tests
    model_config = SettingsConfigDict(env_prefix=Settings.model_config.get("env_prefix", ""), extra="ignore")

    fuzz_examples: int = Field(
        default=0,
        ge=0,
        description="Examples per fuzzed API operation (schemathesis) and per fuzzed property (hypothesis). "
        "0 = the short, derandomized run of `make test`; `make fuzz` sets 2000.",
    )


def fuzz_budget(short_run: int) -> dict[str, Any]:
    """hypothesis settings for a fuzzed property: ``short_run`` examples drawn the same every time
    (a test must not pass or fail by luck), or ``BACKBONES_FUZZ_EXAMPLES`` drawn anew (``make fuzz``)."""
    examples = TestHooks().fuzz_examples
    return {"max_examples": examples or short_run, "derandomize": not examples}


def registry_with(home: Path, *names: str) -> Registry:
    """The registry at ``home``, holding one new version of each catalog model in ``names``."""
    from models.export import export_catalog

    reg = Registry(home)
    for name in names:
        export_catalog(name, registry=reg)
    return reg


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """An empty registry of its own."""
    return Registry(tmp_path / "bentoml")


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry holding one exported tiny_cnn version (shared: do not modify it)."""
    return registry_with(tmp_path_factory.mktemp("tiny") / "bentoml", "tiny_cnn")


@pytest.fixture(scope="session")
def tiny_version(tiny_registry: Registry) -> StoredVersion:
    return tiny_registry.get("tiny_cnn")


@pytest.fixture(scope="session")
def lite0_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry holding the bundled EfficientNet-Lite0, exported once for the session."""
    return registry_with(tmp_path_factory.mktemp("lite0") / "bentoml", "efficientnet_lite0")


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


def assert_clear_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """The CLI failed (exit code 1) with an error naming the problem, and no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


def make_image(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    return synthetic_image(3, size).convert(mode)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real ``backbones serve`` with two workers serving the tiny CNN from a registry of its
    own (shared by the session: tests may kill a worker, which the server replaces). Requests time
    out after 10 s (504)."""
    from .serving import start_server, stop_server

    server = start_server(
        registry_with(tmp_path_factory.mktemp("tiny-serve") / "bentoml", "tiny_cnn").home,
        ["tiny_cnn"],
        tmp_path_factory.mktemp("tiny-serve-log") / "server.log",
        BACKBONES_WORKERS="2",
        BACKBONES_REQUEST_TIMEOUT_SECONDS="10",
    )
    yield server
    stop_server(server)

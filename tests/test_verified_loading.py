"""Every consumer of a version opens its graph the same way (models.inference.open_version): the
preflight child checks it on the providers the session will use, within a memory limit on a CPU,
and the session is built from the bytes whose sha256 the spec records, so a file swapped after
the registry verified it is never the one that runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models import InferenceModel, IntegrityError, Registry
from models import preflight as preflight_module
from models.errors import ArtifactError
from models.export import export_catalog
from models.inference import PREFLIGHT_DIR, open_version, read_verified
from models.preflight import expectation
from models.spec import ONNX_FILENAME

from .conftest import jpeg_bytes


@pytest.fixture
def two_tiny(registry: Registry):  # type: ignore[no-untyped-def]
    """A tiny_cnn version in a registry of its own (the tests change its files)."""
    return export_catalog("tiny_cnn", registry=registry)


def test_a_graph_swapped_after_verification_is_refused(registry: Registry, two_tiny) -> None:  # type: ignore[no-untyped-def]
    stored = registry.get("tiny_cnn")  # verified here
    path = stored.file(ONNX_FILENAME)
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # swapped afterwards
    with pytest.raises(IntegrityError, match="changed after it was verified"):
        read_verified(stored)
    with pytest.raises((ArtifactError, IntegrityError)):
        InferenceModel(stored)
    path.write_bytes(original)
    assert InferenceModel(stored).classify([jpeg_bytes()], k=1)[0][0].score > 0


def test_passes_are_remembered_in_the_registry_for_the_next_process(registry: Registry, two_tiny) -> None:  # type: ignore[no-untyped-def]
    memo = registry.own_dir(PREFLIGHT_DIR)
    assert not memo.exists()
    InferenceModel.load("tiny_cnn", registry=registry)
    (marker,) = memo.iterdir()
    preflight_module._passed.clear()  # as in a new process
    report = preflight_module.preflight(
        two_tiny.file(ONNX_FILENAME),
        expectation(two_tiny.spec),
        sha256=two_tiny.spec.files[ONNX_FILENAME],
        memo_dir=memo,
    )
    assert report.get("cached") is True
    # a pass on other providers is not this pass: the child runs again (ONNX Runtime falls back
    # from a provider it does not have, so this one passes too, under a key of its own)
    preflight_module._passed.clear()
    other = preflight_module.preflight(
        two_tiny.file(ONNX_FILENAME),
        expectation(two_tiny.spec),
        sha256=two_tiny.spec.files[ONNX_FILENAME],
        providers=["NoSuchExecutionProvider", "CPUExecutionProvider"],
        memo_dir=memo,
    )
    assert "cached" not in other
    assert len(list(memo.iterdir())) == 2 and marker.is_file()


def test_an_unwritable_memo_folder_does_not_stop_loading(registry: Registry, two_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    preflight_module._passed.clear()
    session = open_version(two_tiny, memo_dir=blocker / "memo")
    assert session.run(__import__("numpy").zeros((1, 3, 64, 64), "float32")).logits.shape == (1, 10)


def test_the_preflight_child_runs_within_a_memory_limit(registry: Registry, two_tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a CPU the child's address space is bounded; a graph that needs more is refused there."""
    monkeypatch.setattr(preflight_module, "BASE_MEMORY_LIMIT", 48 << 20)
    monkeypatch.setattr(preflight_module, "MEMORY_PER_MODEL_BYTE", 0)
    preflight_module._passed.clear()
    with pytest.raises(ArtifactError, match="refused"):
        preflight_module.preflight(
            two_tiny.file(ONNX_FILENAME), expectation(two_tiny.spec), sha256=two_tiny.spec.files[ONNX_FILENAME]
        )
    assert preflight_module.memory_limit(10, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def test_classify_from_the_cli_runs_the_preflight(run_cli) -> None:  # type: ignore[no-untyped-def]
    image = Path(run_cli.home).parent / "x.jpg"
    image.write_bytes(jpeg_bytes())
    proc = run_cli("classify", "tiny_cnn", str(image), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["predictions"]
    memo = Registry(run_cli.home).own_dir(PREFLIGHT_DIR)
    assert len(list(memo.iterdir())) == 1
    shutil.rmtree(memo)

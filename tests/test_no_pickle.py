"""Nothing is ever unpickled: the source holds no call that could, and the loaders that read files
which could come from someone else (weights, checkpoints, torch.load's default) refuse a pickle
payload without running it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("models", "finetune", "service", "benchmarks", "tests")
# modules whose loaders execute code from the data they read
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def unpickling_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every import of a pickle-like module and every call that can unpickle, as ``file:line what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        last = func.rsplit(".", 1)[-1]
        if func == "torch.load" and not _is_true(_kwarg(node, "weights_only")):
            found.append(f"{where} torch.load without weights_only=True")
        elif func in ("np.load", "numpy.load") and not _pickle_off(node):
            found.append(f"{where} {func} with allow_pickle")
        elif last in ("read_pickle", "unsafe_load", "full_load", "loads_pickle"):
            found.append(f"{where} {func}")
        elif func == "yaml.load" and "Safe" not in ast.unparse(_kwarg(node, "Loader") or ast.Constant(None)):
            found.append(f"{where} yaml.load without a safe loader")
    return found


def _pickle_off(call: ast.Call) -> bool:
    """``np.load`` is safe unless allow_pickle is passed as anything but False."""
    value = _kwarg(call, "allow_pickle")
    return value is None or (isinstance(value, ast.Constant) and value.value is False)


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import pickle
from joblib import load
import torch, numpy as np, yaml
torch.load("x")
torch.load("x", weights_only=False)
np.load("x", allow_pickle=True)
yaml.load(open("x"))
yaml.unsafe_load("x")
"""
    assert len(unpickling_calls(bad)) == 7
    good = """
import torch, numpy as np, yaml
torch.load("x", map_location="cpu", weights_only=True)
np.load("x")
np.load("x", allow_pickle=False)
yaml.safe_load("x")
yaml.load("x", Loader=yaml.SafeLoader)
"""
    assert unpickling_calls(good) == []


def test_no_source_file_can_unpickle() -> None:
    this = Path(__file__).resolve()  # calls torch.load on a payload on purpose, to prove it refuses
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p.resolve() != this]
    assert len(files) > 40  # the scan really covers the project
    found = [hit for p in files for hit in unpickling_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "use safetensors or JSON (or weights_only=True) instead:\n" + "\n".join(found)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    import torch

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_torch_load_refuses_a_pickle_payload_by_default(payload: tuple[Path, Path]) -> None:
    """torchvision and timm load downloaded weights with torch.load's default: it must be safe."""
    import torch

    path, marker = payload
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(path)
    assert not marker.exists()


def test_version_weights_refuse_a_pickle_payload(payload: tuple[Path, Path]) -> None:
    from models.networks import TinyCNN, load_weights, split_torchvision

    path, marker = payload
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error: any refusal will do, running code won't
        load_weights(split_torchvision(TinyCNN(num_classes=10)), path)
    assert not marker.exists()


def test_checkpoints_refuse_a_pickle_payload(payload: tuple[Path, Path], tmp_path: Path) -> None:
    from finetune.checkpoint import FORMAT, load_checkpoint
    from finetune.errors import TrainingError

    path, marker = payload
    ckpt = tmp_path / "checkpoints" / "epoch-0001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"format": FORMAT, "identity": {}}))
    for name in ("model.safetensors", "best.safetensors", "optimizer.safetensors"):
        (ckpt / name).write_bytes(path.read_bytes())
    with pytest.raises(TrainingError, match="cannot read the checkpoint"):
        load_checkpoint(ckpt)
    assert not marker.exists()

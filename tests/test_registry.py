"""The registry on BentoML's model store: immutable checked versions, references, aliases with
history, safe names, atomic registration under kill, concurrent exports."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models import IntegrityError, Registry, RegistryError, UnknownModelError
from models.export import export_catalog
from models.spec import ONNX_FILENAME, SPEC_FILENAME, WEIGHTS_FILENAME

from .conftest import ROOT


@pytest.fixture
def two_versions(registry: Registry) -> tuple[str, str]:
    a = export_catalog("tiny_cnn", registry=registry)
    b = export_catalog("tiny_cnn", registry=registry)
    return a.spec.version, b.spec.version


def test_version_holds_onnx_spec_and_weights_with_checksums(registry: Registry) -> None:
    stored = export_catalog("tiny_cnn", registry=registry)
    assert {ONNX_FILENAME, SPEC_FILENAME, WEIGHTS_FILENAME, "model.yaml"} <= {p.name for p in stored.path.iterdir()}
    spec = stored.spec
    assert set(spec.files) == {ONNX_FILENAME, WEIGHTS_FILENAME}
    assert spec.parent == "catalog:tiny_cnn" and spec.feature_dim == 32 and spec.num_classes == 10
    assert spec.outputs == ("logits", "features") and spec.opset >= 17
    assert {"torch", "onnx", "timm"} <= set(spec.exporter)
    # BentoML itself sees the version (it is a real BentoML model)
    from bentoml._internal.models import ModelStore

    assert str(ModelStore(registry.models_dir).get(f"tiny_cnn:{spec.version}").tag) == spec.tag


def test_references(registry: Registry, two_versions: tuple[str, str]) -> None:
    old, new = two_versions
    assert registry.resolve("tiny_cnn") == ("tiny_cnn", new)  # no production alias: newest
    assert registry.resolve(f"tiny_cnn:{old}") == ("tiny_cnn", old)
    registry.set_alias(f"tiny_cnn:{old}", "production")
    assert registry.resolve("tiny_cnn") == ("tiny_cnn", old)  # production wins over newest
    assert registry.resolve("tiny_cnn@production") == ("tiny_cnn", old)
    with pytest.raises(UnknownModelError, match="no alias 'canary'"):
        registry.resolve("tiny_cnn@canary")
    with pytest.raises(UnknownModelError, match="has no version"):
        registry.resolve("tiny_cnn:zzzz")
    with pytest.raises(UnknownModelError, match="no registered model 'nope'"):
        registry.resolve("nope")


def test_unique_version_prefix_resolves(registry: Registry, two_versions: tuple[str, str]) -> None:
    old, new = two_versions
    common = os.path.commonprefix([old, new])
    assert registry.resolve(f"tiny_cnn:{old[: len(common) + 1]}") == ("tiny_cnn", old)


def test_alias_moves_with_append_only_history(registry: Registry, two_versions: tuple[str, str]) -> None:
    old, new = two_versions
    registry.set_alias(f"tiny_cnn:{old}", "production")
    registry.set_alias(f"tiny_cnn:{new}", "production")
    registry.set_alias(f"tiny_cnn:{old}", "staging")
    registry.remove_alias("tiny_cnn", "staging")
    assert registry.aliases("tiny_cnn") == {"production": new}
    history = registry.alias_history("tiny_cnn")
    assert [(h["alias"], h["action"], h["version"], h["previous"]) for h in history] == [
        ("production", "set", old, None),
        ("production", "set", new, old),
        ("staging", "set", old, None),
        ("staging", "remove", None, old),
    ]
    assert all(h["by"] and h["at"] for h in history)
    with pytest.raises(RegistryError, match="reserved"):
        registry.set_alias("tiny_cnn", "latest")


def test_changed_files_are_refused(registry: Registry) -> None:
    stored = export_catalog("tiny_cnn", registry=registry)
    onnx_path = stored.path / ONNX_FILENAME
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"modified after registration \(model.onnx changed\)"):
        registry.get(stored.tag)


def test_changed_spec_is_refused(registry: Registry) -> None:
    stored = export_catalog("tiny_cnn", registry=registry)
    spec_path = stored.path / SPEC_FILENAME
    doc = json.loads(spec_path.read_text())
    doc["labels"][0] = "tampered"
    spec_path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="spec.json"):
        registry.get(stored.tag)


def test_missing_file_is_refused(registry: Registry) -> None:
    stored = export_catalog("tiny_cnn", registry=registry)
    (stored.path / WEIGHTS_FILENAME).unlink()
    with pytest.raises(IntegrityError, match="weights.safetensors \\(missing\\)"):
        registry.get(stored.tag)


def test_versions_are_immutable(registry: Registry, tiny_version) -> None:  # type: ignore[no-untyped-def]
    stored = export_catalog("tiny_cnn", registry=registry)
    files = {f: stored.path / f for f in stored.spec.files}
    fields = stored.spec.model_dump(exclude={"name", "version", "created_at", "files", "schema_version"})
    with pytest.raises(RegistryError, match="already exists"):
        registry.register("tiny_cnn", files, fields, version=stored.spec.version)
    registry.get(stored.tag)  # the original is untouched and still verifies


@pytest.mark.parametrize("bad", ["../x", "/abs", "", " ", "a b", "UPPER", "x/../../y", "a" * 64, "-x", "x."])
def test_names_that_escape_or_break_the_store_are_rejected(registry: Registry, bad: str) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        registry.resolve(f"{bad}:v1" if bad.strip() and "/" not in bad else bad)
    with pytest.raises(RegistryError, match="invalid"):
        registry.register(bad, {}, {})


def test_delete_keeps_aliased_versions_unless_forced(registry: Registry, two_versions: tuple[str, str]) -> None:
    old, new = two_versions
    registry.set_alias(f"tiny_cnn:{old}", "production")
    with pytest.raises(RegistryError, match="target of alias production"):
        registry.delete(f"tiny_cnn:{old}")
    assert registry.get(f"tiny_cnn:{old}")
    with pytest.raises(RegistryError, match="name a version"):
        registry.delete("tiny_cnn")
    assert registry.delete(f"tiny_cnn:{new}") == f"tiny_cnn:{new}"
    assert [s.version for s in registry.versions("tiny_cnn")] == [old]
    assert (registry.models_dir / "tiny_cnn" / "latest").read_text() == old
    registry.delete(f"tiny_cnn:{old}", force=True)
    assert registry.list() == [] and registry.aliases("tiny_cnn") == {}
    assert registry.alias_history("tiny_cnn")[-1]["action"] == "remove"


_KILL_SCRIPT = """
import sys, os
from pathlib import Path
from models import Registry
from models.export import export_catalog
big = Path(sys.argv[2])
reg = Registry(sys.argv[1])
while True:
    from models.weights import build_pretrained
    from models.export import register_backbone
    from models import get_entry
    e = get_entry("tiny_cnn")
    register_backbone(build_pretrained(e), registry=reg, name="tiny_cnn", preprocess=e.preprocess,
                      labels=e.labels(), parent="catalog:tiny_cnn", architecture=e.architecture,
                      extra_files={"ballast.bin": big})
    print("registered", flush=True)
"""


@pytest.mark.slow
def test_registration_is_atomic_under_kill(tmp_path: Path) -> None:
    """SIGKILL at random moments while versions are registered: every version in the store is
    whole and verifies, nothing half-written is visible, and leftovers are cleaned later."""
    home = tmp_path / "bentoml"
    big = tmp_path / "ballast.bin"
    big.write_bytes(os.urandom(64 << 20))  # copying it makes the window for a kill wide
    rng = random.Random(7)
    staging = home / "backbones" / "staging"
    registered = 0
    interrupted = 0  # kills that left a registration half-done (the next one cleans it up)
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_SCRIPT, str(home), str(big)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        if attempt < 4:
            # wait until a registration is under way (its staging folder exists), then kill inside it
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(6.0, 12.0))  # and once at an arbitrary moment
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        registered += out.count("registered")
        interrupted += staging.is_dir() and any(staging.iterdir())
    reg = Registry(home)
    versions = reg.versions("tiny_cnn")
    assert len(versions) == registered
    for spec in versions:
        reg.get(spec.tag)  # whole: every checksum matches
    version_dirs = [p for p in (home / "models" / "tiny_cnn").iterdir() if p.is_dir()] if versions else []
    assert len(version_dirs) == len(versions)  # no partial version directory in the store
    assert interrupted >= 1, "no kill landed inside a registration: this run proved nothing"
    export_catalog("tiny_cnn", registry=reg)  # the next registration cleans what the killed ones left
    assert list((home / "backbones" / "staging").iterdir()) == []


@pytest.mark.slow
def test_two_exports_at_once_both_succeed(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli", "export", "tiny_cnn"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    tags = {o[0].strip() for o in outs}
    assert len(tags) == 2
    reg = Registry(tmp_path / "bentoml")
    assert {s.tag for s in reg.versions("tiny_cnn")} == tags
    for tag in tags:
        reg.get(tag)


@pytest.mark.parametrize("ref", ["tiny_cnn\n", " tiny_cnn", "tiny_cnn@production\n", "tiny_cnn:v1\n"])
def test_references_are_matched_whole(registry: Registry, two_versions: tuple[str, str], ref: str) -> None:
    """A trailing newline or a space is not part of a name: such a reference names nothing."""
    registry.set_alias(f"tiny_cnn:{two_versions[0]}", "production")
    registry.resolve(ref.strip().replace(":v1", f":{two_versions[0]}"))  # the exact name resolves
    with pytest.raises(RegistryError, match="invalid"):
        registry.resolve(ref)


def test_alias_and_latest_files_keep_the_umask_mode(registry: Registry, two_versions: tuple[str, str]) -> None:
    """Another user (a pod reading what CI wrote) can read the files that name versions."""
    old = os.umask(0o022)
    try:
        registry.set_alias(f"tiny_cnn:{two_versions[0]}", "production")
        export_catalog("tiny_cnn", registry=registry)  # rewrites `latest`
    finally:
        os.umask(old)
    alias_file = registry.own_dir("aliases", "tiny_cnn.json")
    latest = registry.models_dir / "tiny_cnn" / "latest"
    for f in (alias_file, latest):
        assert f.stat().st_mode & 0o777 == 0o644, f


@pytest.mark.parametrize(
    "content", [b"{not json", b"[]", b'{"aliases": {"production": 3}, "history": []}', b"\xff\xfe"]
)
def test_a_corrupt_alias_file_is_a_clear_error(
    registry: Registry, two_versions: tuple[str, str], content: bytes
) -> None:
    registry.set_alias(f"tiny_cnn:{two_versions[0]}", "production")
    registry.own_dir("aliases", "tiny_cnn.json").write_bytes(content)
    with pytest.raises(RegistryError, match="alias file of tiny_cnn is (unreadable|malformed)") as e:
        registry.resolve("tiny_cnn@production")
    assert str(registry.home) not in str(e.value)  # error texts reach clients: no file-system paths
    registry.get(f"tiny_cnn:{two_versions[1]}")  # the versions themselves are untouched


@pytest.mark.parametrize(
    "change",
    [
        {"std": [0.0, 0.2, 0.2]},
        {"mean": ["NaN", 0.4, 0.4]},
        {"std": [0.2, "Infinity", 0.2]},
        {"crop": 100000, "resize": 100000},
        {"resize": 5000},
        {"crop": 0},
    ],
)
def test_spec_values_are_checked_on_load(registry: Registry, change: dict[str, object]) -> None:
    """A spec is data on disk: preprocessing that would divide by zero, produce NaN or allocate
    gigabytes per request is refused when the version is read, even with matching checksums."""
    stored = export_catalog("tiny_cnn", registry=registry)
    vdir = stored.path
    doc = json.loads((vdir / SPEC_FILENAME).read_text())
    doc["preprocess"].update(change)
    (vdir / SPEC_FILENAME).write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="unreadable spec.json"):
        registry.get(stored.tag)

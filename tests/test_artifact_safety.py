"""Artifact safety: ONNX files that reference external data, have the wrong inputs or outputs,
fail at run time, crash or hang ONNX Runtime are refused before they are stored or served; names
that try to leave the store are rejected; nothing is ever unpickled."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import InferenceModel, Registry, RegistryError, Settings, UnknownModelError
from models.errors import ArtifactError, IntegrityError
from models.preflight import run_child
from models.registry import Ref
from models.spec import ONNX_FILENAME, SPEC_FILENAME, Architecture, Preprocess

from .conftest import assert_clear_error

# bentoml.metrics (used by service/metrics.py) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")
CROP, CLASSES, FEATURES = 8, 4, 3


def graph_file(
    path: Path,
    *,
    outputs: tuple[str, str] = ("logits", "features"),
    classes: int = CLASSES,
    declared_classes: int | None = None,
    batch: int | str = "batch",
    external: bool = False,
    reshape_to: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """A real little CNN head in ONNX: input (N, 3, CROP, CROP) -> pooled features -> logits."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((FEATURES, classes)).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], [outputs[1]]),
        helper.make_node("MatMul", [outputs[1], "w"], ["scores"]),
    ]
    initializers = [weight]
    if reshape_to is not None:  # a shape that only fails once the graph runs
        initializers.append(numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["scores", "shape"], [outputs[0]]))
    else:
        nodes.append(helper.make_node("Identity", ["scores"], [outputs[0]]))
    if external:
        (path.parent / "w.bin").write_bytes(weight.raw_data)
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="w.bin")
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, CROP, CROP])],
        [
            helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, ["batch", declared_classes or classes]),
            helper.make_tensor_value_info(outputs[1], TensorProto.FLOAT, ["batch", FEATURES]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def spec_fields() -> dict[str, Any]:
    return {
        "parent": "test",
        "architecture": Architecture(family="builtin", name="tiny_cnn", num_classes=CLASSES),
        "labels": [f"c{i}" for i in range(CLASSES)],
        "preprocess": Preprocess(resize=CROP, crop=CROP),
        "feature_dim": FEATURES,
        "opset": 17,
        "exporter": {},
    }


def store_state(reg: Registry) -> tuple[list[str], list[Path]]:
    staging = reg.home / "backbones" / "staging"
    return [s.tag for s in reg.list()], sorted(staging.iterdir()) if staging.is_dir() else []


def test_a_good_graph_registers_and_serves(registry: Registry, tmp_path: Path) -> None:
    stored = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "m.onnx")}, spec_fields())
    model = InferenceModel(registry.get(stored.tag), preflight=True, settings=Settings(providers="cpu"))
    out = model.run(np.ones((3, 3, CROP, CROP), dtype=np.float32))
    assert out.logits.shape == (3, CLASSES) and out.features.shape == (3, FEATURES)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"external": True}, "external data"),
        ({"outputs": ("probs", "features")}, "outputs are ['probs', 'features']"),
        ({"declared_classes": 5, "classes": 5}, "output 'logits' is declared with shape ['batch', 5]"),
        ({"declared_classes": 4, "classes": 5}, "output 'logits' has shape [2, 5]"),
        ({"batch": 1}, "dynamic batch axis"),
        ({"reshape_to": [-1, 5]}, "fails to run the graph"),
    ],
)
def test_bad_graphs_are_refused_and_nothing_is_stored(
    registry: Registry, tmp_path: Path, variant: dict[str, Any], message: str
) -> None:
    good = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "good.onnx")}, spec_fields())
    before = store_state(registry)
    bad = graph_file(tmp_path / "bad.onnx", **variant)
    with pytest.raises(ArtifactError, match="refused") as info:
        registry.register("head", {ONNX_FILENAME: bad}, spec_fields())
    assert message in str(info.value)
    assert store_state(registry) == before == ([good.tag], [])
    registry.get(good.tag)  # the version already there is untouched


def test_a_file_that_is_not_onnx_is_refused(registry: Registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    with pytest.raises(ArtifactError, match="not .*ONNX model"):
        registry.register("head", {ONNX_FILENAME: junk}, spec_fields())
    with pytest.raises(RegistryError, match="needs its model.onnx"):
        registry.register("head", {"notes.txt": junk}, spec_fields())
    assert store_state(registry) == ([], [])


def test_a_crash_in_the_child_is_a_clear_refusal() -> None:
    # a real segmentation fault in a real child process (what a malformed graph can do to ORT)
    with pytest.raises(ArtifactError, match=r"crashed \(SIGSEGV\)"):
        run_child([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], timeout=60)
    with pytest.raises(ArtifactError, match="exit 3"):
        run_child([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)


def test_a_hang_is_refused_after_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"longer than 0.5 s"):
        run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    reg = Registry(tmp_path / "bentoml", settings=Settings(preflight_timeout_seconds=0.001))
    fresh = graph_file(tmp_path / "m.onnx", seed=1)  # a file no earlier preflight in this process passed
    with pytest.raises(ArtifactError, match="preflight_timeout_seconds"):
        reg.register("head", {ONNX_FILENAME: fresh}, spec_fields())
    assert store_state(reg) == ([], [])


def forge(registry: Registry, tag: str, onnx_bytes: bytes) -> None:
    """Replace a stored version's model.onnx and rewrite every checksum to match, as someone with
    write access to the store could: checksums then pass, and only the preflight stands guard."""
    from bentoml._internal.models.model import Model

    vdir = registry.get(tag).path
    (vdir / ONNX_FILENAME).write_bytes(onnx_bytes)
    doc = json.loads((vdir / SPEC_FILENAME).read_text())
    doc["files"][ONNX_FILENAME] = hashlib.sha256(onnx_bytes).hexdigest()
    spec_bytes = json.dumps(doc).encode()
    (vdir / SPEC_FILENAME).write_bytes(spec_bytes)
    model = Model.from_path(vdir)
    model.info.metadata["spec_sha256"] = hashlib.sha256(spec_bytes).hexdigest()
    with open(vdir / "model.yaml", "w") as f:
        model.info.dump(f)


def test_a_forged_version_never_reaches_the_service(registry: Registry, tmp_path: Path) -> None:
    from service.pool import ModelPool

    good = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "good.onnx")}, spec_fields())
    forged = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "m.onnx")}, spec_fields())
    forge(registry, forged.tag, graph_file(tmp_path / "bad.onnx", reshape_to=[-1, 5]).read_bytes())
    registry.get(forged.tag)  # every checksum matches the forged file

    settings = Settings(providers="cpu", max_batch_size=2, swap_poll_seconds=60)

    async def serve(ref: str) -> tuple[bool, str | None, str | None]:
        pool = ModelPool([ref], settings=settings, registry=registry)
        await pool.start()
        slot = pool.slots[0]
        result = (pool.ready, slot.error, slot.current.tag if slot.current else None)
        await pool.close()
        return result

    ready, error, _ = asyncio.run(serve(forged.tag))
    assert not ready and error is not None and "refused" in error and "fails to run" in error
    assert asyncio.run(serve(good.tag)) == (True, None, good.tag)


@pytest.mark.parametrize(
    "bad",
    ["../x", "/abs", "", " ", "\t", "a/b", "timm/../x", "timm/a/b", "x\x00y", "x:", "x@", "x:../y", "x@../y", "x:a/b"],
)
def test_references_that_escape_the_store_are_rejected(registry: Registry, bad: str) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        Ref.parse(bad)
    with pytest.raises(RegistryError, match="invalid"):
        registry.resolve(bad)
    with pytest.raises(RegistryError, match="invalid"):
        registry.delete(bad)
    assert not (registry.home.parent / "x").exists()


def test_timm_names_still_map_into_the_store() -> None:
    assert Ref.parse("timm/ResNet50.a1_in1k") == Ref("timm-resnet50.a1_in1k")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models", "show", "a/b"], "invalid model name 'a/b'"),
        (["models", "show", "/etc/passwd"], "invalid model name '/etc/passwd'"),
        (["models", "delete", "x:../../y"], "invalid version '../../y'"),
        (["models", "alias", "x", "../prod"], "invalid alias '../prod'"),
        (["classify", "x@", "img.jpg"], "invalid alias ''"),
    ],
)
def test_the_cli_rejects_escaping_names_in_one_line(run_cli, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    assert_clear_error(run_cli(*args), message)


def test_an_alias_file_pointing_outside_the_store_is_refused(registry: Registry, tmp_path: Path) -> None:
    stored = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "m.onnx")}, spec_fields())
    registry.set_alias(stored.tag, "production")
    path = registry.home / "backbones" / "aliases" / "head.json"
    doc = json.loads(path.read_text())
    for target in ("../../../etc", "nothere"):
        doc["aliases"]["production"] = target
        path.write_text(json.dumps(doc))
        with pytest.raises(UnknownModelError, match="not a version of head"):
            registry.get("head@production")


def test_a_spec_listing_paths_or_another_version_is_refused(registry: Registry, tmp_path: Path) -> None:
    a = registry.register("head", {ONNX_FILENAME: graph_file(tmp_path / "m.onnx")}, spec_fields())
    spec_path = a.path / SPEC_FILENAME
    original = spec_path.read_bytes()
    doc = json.loads(original)
    doc["files"]["../../outside"] = "0" * 64
    spec_path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="'../../outside'"):
        registry.get(a.tag)
    doc = json.loads(original)
    doc["version"] = "other"
    spec_path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="holds the spec of head:other"):
        registry.get(a.tag)
    assert registry.list() == []  # not listed under either name

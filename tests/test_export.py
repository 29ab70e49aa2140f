"""Export parity: ONNX Runtime vs PyTorch on the same preprocessed tensors; a failed check registers nothing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models import ExportError, Registry, get_entry
from models.export import export_onnx, register_backbone, verification_batch, verify_export
from models.networks import Backbone, build_architecture, load_weights
from models.runtime import OnnxSession
from models.settings import Settings
from models.spec import ONNX_FILENAME, WEIGHTS_FILENAME
from models.weights import build_pretrained

from .conftest import jpeg_bytes, shared_data


def _torch_outputs(net: Backbone, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, features = net.eval()(torch.from_numpy(batch))
    return logits.numpy(), features.numpy()


def test_tiny_graph_has_named_outputs_and_dynamic_batch(tiny_version) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(tiny_version.file(ONNX_FILENAME)))
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    session = OnnxSession(tiny_version.file(ONNX_FILENAME), settings=Settings(providers="cpu"))
    for n in (1, 3, 7):
        out = session.run(np.zeros((n, 3, 64, 64), np.float32))
        assert out.logits.shape == (n, 10) and out.features.shape == (n, 32)


def test_tiny_parity_with_stored_weights(tiny_version) -> None:  # type: ignore[no-untyped-def]
    """The stored safetensors rebuild the exact network the ONNX graph came from."""
    spec = tiny_version.spec
    net = load_weights(build_architecture(spec.architecture), tiny_version.file(WEIGHTS_FILENAME))
    batch = verification_batch(spec.preprocess, [jpeg_bytes(i) for i in range(6)])
    ref_logits, ref_features = _torch_outputs(net, batch)
    out = OnnxSession(tiny_version.file(ONNX_FILENAME), settings=Settings(providers="cpu")).run(batch)
    assert np.abs(out.logits - ref_logits).max() <= 1e-3
    assert np.abs(out.features - ref_features).max() <= 1e-3
    assert (out.logits.argmax(1) == ref_logits.argmax(1)).all()
    assert spec.verification["max_abs_logit_diff"] <= 1e-3 and spec.verification["images"] == 8


@pytest.mark.slow
def test_lite0_parity_on_synthetic_and_real_photos(lite0_registry: Registry) -> None:
    stored = lite0_registry.get("efficientnet_lite0")
    assert stored.spec.verification["max_abs_logit_diff"] <= 1e-3
    net = build_pretrained(get_entry("efficientnet_lite0"))
    session = OnnxSession(stored.file(ONNX_FILENAME), settings=Settings(providers="cpu"))
    try:
        photos = sorted(shared_data("imagenet-sample").iterdir())[:16]
    except pytest.skip.Exception:
        photos = []
    batch = verification_batch(stored.spec.preprocess, photos or [jpeg_bytes(i) for i in range(8)])
    ref_logits, _ = _torch_outputs(net, batch)
    out = session.run(batch)
    assert np.abs(out.logits - ref_logits).max() <= 1e-3
    assert (out.logits.argmax(1) == ref_logits.argmax(1)).all()
    # features are the pooled pre-logits vector: the head applied to them gives the logits
    head = net.head.weight.detach().numpy(), net.head.bias.detach().numpy()
    np.testing.assert_allclose(out.features @ head[0].T + head[1], out.logits, atol=1e-3)


class _Drifting(torch.nn.Module):
    """Its PyTorch output changes between export and verification: the check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean(dim=(2, 3)) + 0.01 * self.calls


def test_a_mismatch_fails_the_export_and_registers_nothing(registry: Registry) -> None:
    entry = get_entry("tiny_cnn")
    net = Backbone(_Drifting(), torch.nn.Linear(3, 10))
    with pytest.raises(ExportError, match="differ by"):
        register_backbone(
            net,
            registry=registry,
            name="drift",
            preprocess=entry.preprocess,
            labels=entry.labels(),
            parent="test",
            architecture=entry.architecture,
        )
    assert registry.list() == []


def test_label_count_must_match_the_head(registry: Registry) -> None:
    entry = get_entry("tiny_cnn")
    with pytest.raises(ExportError, match="3 labels for a head of 10 classes"):
        register_backbone(
            build_pretrained(entry),
            registry=registry,
            name="x",
            preprocess=entry.preprocess,
            labels=["a", "b", "c"],
            parent="test",
            architecture=entry.architecture,
        )


def test_verify_rejects_a_graph_without_the_project_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = build_pretrained(get_entry("tiny_cnn"))
    path = tmp_path / "m.onnx"
    export_onnx(net, path, 64)
    model = onnx.load(str(path))
    model.graph.output[1].name = "pooled"
    for node in model.graph.node:
        node.output[:] = ["pooled" if o == "features" else o for o in node.output]
        node.input[:] = ["pooled" if i == "features" else i for i in node.input]
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=r"outputs are \['logits', 'pooled'\]"):
        verify_export(path, net, np.zeros((2, 3, 64, 64), np.float32))

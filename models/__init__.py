"""Pretrained CNN backbones as verified, versioned ONNX artifacts.

The catalog of pretrained models, the one eval preprocessing, ONNX export with parity checks,
the registry (on BentoML's model store) and the ONNX Runtime session factory. No HTTP here.
"""

from .catalog import CatalogEntry, catalog, get_entry, register_catalog
from .errors import (
    BackbonesError,
    ConversionError,
    ExportError,
    ImageError,
    IntegrityError,
    RegistryError,
    UnknownModelError,
    WeightsUnavailableError,
)
from .imaging import decode_image
from .inference import InferenceModel, Prediction, top_k
from .preprocess import ImageLoader, eval_transform
from .registry import Ref, Registry, StoredVersion
from .runtime import OnnxSession, select_providers
from .settings import Settings, get_settings
from .spec import Preprocess, VersionSpec

__all__ = [
    "BackbonesError",
    "CatalogEntry",
    "ConversionError",
    "ExportError",
    "ImageError",
    "ImageLoader",
    "InferenceModel",
    "IntegrityError",
    "OnnxSession",
    "Prediction",
    "Preprocess",
    "Ref",
    "Registry",
    "RegistryError",
    "Settings",
    "StoredVersion",
    "UnknownModelError",
    "VersionSpec",
    "WeightsUnavailableError",
    "catalog",
    "decode_image",
    "eval_transform",
    "get_entry",
    "get_settings",
    "register_catalog",
    "select_providers",
    "top_k",
]

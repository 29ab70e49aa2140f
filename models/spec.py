"""What travels with every model version: preprocessing, labels, lineage and checksums (``spec.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
SPEC_FILENAME = "spec.json"
ONNX_FILENAME = "model.onnx"
WEIGHTS_FILENAME = "weights.safetensors"
SCHEMA_VERSION = 1

# Bounds a spec's preprocessing must keep: a spec is data on disk, and a crop or a resize of 10^5
# pixels would make every request allocate gigabytes.
MAX_CROP = 2048
MAX_RESIZE = 4096

Interpolation = Literal["bilinear", "bicubic", "nearest"]
# fp32: as exported from PyTorch; int8: statically quantized (QDQ) on CPUs; fp16: for GPUs.
# Every precision keeps float32 inputs and outputs, so a caller never sees the difference.
Precision = Literal["fp32", "int8", "fp16"]


@dataclass(frozen=True)
class Preprocess:
    """The eval preprocessing of a model, as torchvision's ``weights.transforms()`` and timm's
    ``pretrained_cfg`` describe it: resize the shorter side, center-crop a square, normalize."""

    resize: int = 256  # shorter side before the crop
    crop: int = 224
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not (0 < self.crop <= MAX_CROP and self.crop <= self.resize <= MAX_RESIZE):
            raise ValueError(
                f"preprocess needs 0 < crop <= {MAX_CROP} and crop <= resize <= {MAX_RESIZE}, "
                f"got crop={self.crop}, resize={self.resize}"
            )
        values = (*self.mean, *self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in values) or min(self.std) <= 0:
            raise ValueError(f"preprocess needs 3 finite means and 3 finite positive stds, got {self.mean}, {self.std}")

    @classmethod
    def from_crop_pct(cls, crop: int, crop_pct: float, **kwargs: Any) -> Preprocess:
        """timm's convention: the resize is ``floor(crop / crop_pct)`` (224 at 0.875 -> 256)."""
        return cls(resize=math.floor(crop / crop_pct), crop=crop, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Architecture(BaseModel):
    """How to rebuild the PyTorch module whose weights are stored with a version."""

    model_config = ConfigDict(frozen=True)

    family: Literal["timm", "torchvision", "builtin"]
    name: str
    num_classes: int = Field(gt=0)


class VersionSpec(BaseModel):
    """The record of one registered model version, written next to ``model.onnx`` as ``spec.json``."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created_at: datetime
    parent: str  # "catalog:<name>" or "<name>:<version>"
    architecture: Architecture
    labels: list[str]
    preprocess: Preprocess
    feature_dim: int = Field(gt=0)
    input_name: str = INPUT_NAME
    outputs: tuple[str, str] = OUTPUT_NAMES
    opset: int
    exporter: dict[str, str]
    files: dict[str, str]  # file name -> sha256
    verification: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)  # where the weights came from
    training: dict[str, Any] | None = None  # fine-tuned versions: data fingerprint, split, metrics
    precision: Precision = "fp32"
    # int8/fp16 versions: parent tag, method, calibration fingerprint and counts, held-out agreement
    # with the parent, max logit error, the threshold it had to pass (models/convert.py)
    conversion: dict[str, Any] | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

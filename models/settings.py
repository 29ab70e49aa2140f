"""The one typed entry point for configuration. Nothing else in the project reads ``os.environ``.

Every field can be set from the environment as ``BACKBONES_<FIELD>`` (for example
``BACKBONES_PROVIDERS=cpu``); the registry location is BentoML's own ``BENTOML_HOME``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderChoice = Literal["auto", "cpu", "cuda", "tensorrt"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BACKBONES_", extra="ignore")

    bentoml_home: Path | None = Field(
        default=None,
        validation_alias="BENTOML_HOME",
        description="Registry root (BentoML's home). Unset: BentoML's default, ~/bentoml.",
    )
    torch_home: Path | None = Field(
        default=None, validation_alias="TORCH_HOME", description="torchvision's weight cache root (torch.hub)."
    )
    xdg_cache_home: Path | None = Field(default=None, validation_alias="XDG_CACHE_HOME")
    providers: ProviderChoice = Field(
        default="auto",
        description="ONNX Runtime execution providers: auto = TensorRT, then CUDA, then CPU, "
        "as far as they are installed and a GPU driver is present.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime threads per session; 0 = one per available core."
    )
    trt_fp16: bool = Field(default=True, description="Let TensorRT build FP16 engines.")
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine and timing caches. Unset: <registry root>/backbones/trt-cache.",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Images declaring more pixels are refused before they are decoded (decompression bombs).",
    )
    draft_decoding: bool = Field(
        default=True,
        description="Let the JPEG decoder downscale large photos while decoding (see docs/benchmarks.md "
        "for its effect on accuracy and speed).",
    )

    def torch_hub_dir(self) -> Path:
        """Where torch.hub keeps downloads, by torch's own rule (TORCH_HOME, XDG_CACHE_HOME, ~/.cache)."""
        root = self.torch_home or (self.xdg_cache_home or Path("~/.cache")) / "torch"
        return root.expanduser() / "hub"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()

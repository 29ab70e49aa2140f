"""Everything one fine-tuning run is asked to do, as one typed object.

The CLI maps its options onto :class:`FinetuneConfig`; ``python -m finetune.train`` (the entry point
``torchrun`` starts once per process) reads the same object from JSON, so a distributed run sees
exactly the options the user typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import RegistryError
from models.registry import Ref, validate_name

Mode = Literal["linear", "full"]
Device = Literal["auto", "cpu", "cuda"]

# Full fine-tune defaults, for ImageNet backbones on a few hundred to a few thousand images.
DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3  # the new head's peak learning rate (AdamW)
DEFAULT_BACKBONE_LR_SCALE = 0.1  # pretrained layers move 10x slower than the new head
DEFAULT_BATCH_SIZE = 32


class FinetuneConfig(BaseModel):
    """One run's options. Paths are resolved when the run starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(description="ImageFolder (one sub-folder per class) or CSV manifest (path,label)")
    backbone: str = Field(description="model reference: catalog name, NAME, NAME:VERSION or NAME@ALIAS")
    name: str = Field(description="registry name of the new version")
    mode: Mode = "linear"
    val_dir: Path | None = Field(default=None, description="validation ImageFolder/CSV; else a split of DATA")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: int = 0
    promote_if_better: str | None = Field(default=None, description="alias to move if the new version is better")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=4096)
    top_k: int = Field(default=5, ge=1)
    imbalance_ratio: float = Field(
        default=3.0, gt=1.0, description="warn when the largest class has this many times the smallest's images"
    )
    workers: int | None = Field(default=None, ge=0, description="decode workers; None = from the cores")
    # linear probe
    weight_decay: float | None = Field(
        default=None, ge=0.0, description="L2 strength; linear: None = chosen by cross-validation on the train split"
    )
    # full fine-tune
    epochs: int = Field(default=DEFAULT_EPOCHS, ge=1)
    lr: float = Field(default=DEFAULT_LR, gt=0.0)
    backbone_lr_scale: float = Field(default=DEFAULT_BACKBONE_LR_SCALE, ge=0.0, le=1.0)
    warmup_epochs: float = Field(default=1.0, ge=0.0)
    freeze_epochs: int = Field(default=0, ge=0, description="epochs with the backbone frozen (head only) first")
    patience: int = Field(default=3, ge=1, description="early stopping: epochs without a better val loss")
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    device: Device = "auto"
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on the CPU)")
    resume: bool = False
    run_dir: Path | None = Field(default=None, description="checkpoints; None = <registry>/backbones/runs/<name>")
    stop_after_epochs: int | None = Field(
        default=None,
        ge=1,
        description="stop after this many epochs with the checkpoint written and nothing registered, "
        "as an interrupted run would (resume later with resume=True)",
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        validate_name(self.name)
        Ref.parse(self.backbone)
        if self.promote_if_better is not None:
            validate_name(self.promote_if_better, "alias")
            if self.promote_if_better == "latest":
                raise RegistryError("'latest' is not an alias (a bare name already means the newest version)")
        return self

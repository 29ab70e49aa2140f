"""Everything one fine-tuning run is asked to do, as one typed object, and the one place its
defaults are defined.

The ``backbones finetune`` options are made from these fields (default, limits, help text), and
``python -m finetune.train`` (the entry point ``torchrun`` starts once per process) reads the same
object from JSON, so a distributed run sees exactly the options the user typed. Functions of this
package that take one of these options as a parameter default to the field's value
(:func:`config_default`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

from models.catalog import catalog
from models.errors import RegistryError
from models.registry import Ref, validate_name
from models.storage import is_url

Mode = Literal["linear", "full"]
Device = Literal["auto", "cpu", "cuda"]
# Which views of each training image the linear probe fits on (finetune/views.py: VIEW_SETS).
Views = Literal["center", "flip", "flip-crops"]

# ``--backbone auto``: a probe on each offline catalog backbone (models/catalog.py, ``bundled``).
AUTO_BACKBONE = "auto"

# AdamW's weight decay in the full fine-tune when ``weight_decay`` is not given (the linear probe
# chooses its own by cross-validation instead).
FULL_WEIGHT_DECAY = 0.05


def _location(value: Any) -> Path | str:
    """A dataset's location as given: an object store URL stays a string, anything else is a path."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a path or an s3:// URL, got {type(value).__name__}")
    return value if is_url(value) else Path(value)


# A local folder or file (a Path), or an object store URL such as s3://bucket/prefix (a string:
# a Path would fold its '//').
DataLocation = Annotated[Path | str, PlainValidator(_location)]

# The key that marks a field of the full recipe only in its ``json_schema_extra``.
FULL_ONLY = "full_only"


def _full_only(default: Any, description: str, **limits: Any) -> Any:
    """A field the full fine-tune alone reads; ``backbones finetune`` refuses it with --mode linear,
    whose head is fitted in one solve."""
    return Field(default=default, description=f"Full: {description}", json_schema_extra={FULL_ONLY: True}, **limits)


class FinetuneConfig(BaseModel):
    """One run's options. Paths are resolved when the run starts.

    The defaults suit ImageNet backbones on a few hundred to a few thousand images.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataLocation = Field(
        description="ImageFolder (one sub-folder per class) or CSV manifest (path,label), local or s3://"
    )
    backbone: str = Field(
        description="Model to start from: catalog name, NAME, NAME:VERSION or NAME@ALIAS. Linear: several, "
        "comma-separated, or 'auto' (every offline catalog backbone): a probe on each, the best by "
        "cross-validation on the training split is registered."
    )
    name: str = Field(description="Registry name of the new version.")
    mode: Mode = Field(default="linear", description="linear: new head on frozen features; full: train every layer.")
    val_dir: DataLocation | None = Field(
        default=None,
        description="Validation ImageFolder or CSV, local or s3:// (instead of a split of the training data).",
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each class held out for validation.")
    seed: int = Field(default=0, description="Seed of the split, the initialisation and the augmentation.")
    promote_if_better: str | None = Field(
        default=None,
        description="Move NAME@ALIAS to the new version only if it is more accurate on the same validation images.",
    )
    # 30: below that, one image is more than 3 points of accuracy, and a "better" model is mostly luck
    gate_min_images: int = Field(
        default=30,
        ge=1,
        description="Promotion: with fewer validation images than this, the gate refuses to compare "
        "(too few to tell) unless --force-promotion.",
    )
    force_promotion: bool = Field(
        default=False,
        description="Promotion: compare even with fewer than --gate-min-images validation images "
        "(the alias still moves only to a more accurate version).",
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per batch (features, training, evaluation).")
    top_k: int = Field(default=5, ge=1, description="k of the top-k accuracy in the report.")
    imbalance_ratio: float = Field(
        default=3.0, gt=1, description="Warn when the largest class has this many times the images of the smallest."
    )
    workers: int | None = Field(
        default=None, ge=0, description="Image decoding workers (unless given: from the cores)."
    )
    weight_decay: float | None = Field(
        default=None,
        ge=0,
        description="Linear: L2 strength (unless given: chosen by cross-validation on the training split); "
        f"full: AdamW weight decay (unless given: {FULL_WEIGHT_DECAY}).",
    )
    views: Views = Field(
        default="center",
        description="Linear: views of each training image the head is fitted on: center (the eval view), "
        "flip (and its mirror image), flip-crops (and crops at two more scales, each mirrored too).",
    )
    # the full fine-tune's recipe
    epochs: int = _full_only(10, "epochs to train.", ge=1)
    lr: float = _full_only(1e-3, "peak learning rate of the new head (AdamW).", gt=0)
    # pretrained layers move slower than the new head
    backbone_lr_scale: float = _full_only(0.1, "backbone learning rate = lr x this.", ge=0, le=1)
    warmup_epochs: float = _full_only(1.0, "epochs of linear learning-rate warmup.", ge=0)
    freeze_epochs: int = _full_only(0, "first epochs with the backbone frozen (the head alone trains).", ge=0)
    patience: int = _full_only(3, "stop after this many epochs without a better selection loss.", ge=1)
    # The epoch is chosen on images held out of the training split, never on the validation split
    # that the report and the promotion gate measure on.
    selection_fraction: float = _full_only(
        0.15, "share of each training class held out to choose the epoch (early stopping).", gt=0, lt=1
    )
    label_smoothing: float = _full_only(0.1, "label smoothing of the cross-entropy.", ge=0, lt=1)
    # device, amp and run_dir: read by the full fine-tune alone, accepted (and unused) with --mode linear
    device: Device = Field(default="auto", description="Full: the device to train on.")
    amp: bool = Field(default=True, description="Full: mixed precision on CUDA (ignored on the CPU).")
    run_dir: Path | None = Field(
        default=None, description="Full: the run's checkpoints (unless given: $BENTOML_HOME/backbones/runs/NAME)."
    )
    resume: bool = _full_only(False, "continue the run interrupted in --run-dir (same data and options).")
    stop_after_epochs: int | None = _full_only(
        None, "stop after this epoch with its checkpoint written, registering nothing (continue with --resume).", ge=1
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        validate_name(self.name)
        parts = self.backbones
        for ref in parts:
            Ref.parse(ref)
        if self.mode == "full" and len(parts) > 1:
            raise RegistryError(
                f"--backbone {self.backbone!r} compares several backbones, which the linear probe alone does; "
                "give one backbone with --mode full"
            )
        if self.promote_if_better is not None:
            validate_name(self.promote_if_better, "alias")
            if self.promote_if_better == "latest":
                raise RegistryError("'latest' is not an alias (a bare name already means the newest version)")
        return self

    @property
    def backbones(self) -> list[str]:
        """The backbones to start from: ``backbone`` split at its commas, ``auto`` the offline
        catalog backbones (not the test model)."""
        if self.backbone == AUTO_BACKBONE:
            return [e.name for e in catalog() if e.bundled and e.family != "builtin"]
        parts = self.backbone.split(",")
        if any(not p for p in parts):
            raise RegistryError(
                f"--backbone {self.backbone!r} has an empty entry; separate references by single commas"
            )
        if len(set(parts)) != len(parts):
            raise RegistryError(f"--backbone {self.backbone!r} names a backbone twice")
        if AUTO_BACKBONE in parts and len(parts) > 1:
            raise RegistryError(f"--backbone {self.backbone!r}: 'auto' stands alone")
        return parts

    @property
    def full_weight_decay(self) -> float:
        """The full fine-tune's AdamW weight decay: ``weight_decay``, else :data:`FULL_WEIGHT_DECAY`."""
        return FULL_WEIGHT_DECAY if self.weight_decay is None else self.weight_decay

    @classmethod
    def full_only_fields(cls) -> list[str]:
        """The fields ``backbones finetune`` refuses with --mode linear."""
        return [
            name
            for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(FULL_ONLY)
        ]


def config_default(field: str) -> Any:
    """The default of one :class:`FinetuneConfig` field (for the parameters of this package's
    functions that take the same option)."""
    return FinetuneConfig.model_fields[field].get_default(call_default_factory=True)

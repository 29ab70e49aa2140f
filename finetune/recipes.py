"""The two recipes as one step of a run: each turns the checked split into the parent's network with
a head for the split's labels, that network's validation logits, and the report's ``recipe`` section.

Both end with one PyTorch :class:`~models.networks.Backbone` (the parent's body and the new head),
which the run then exports and registers like any other version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import StoredVersion
from models.networks import Backbone, build_architecture, load_weights
from models.preprocess import ImageLoader
from models.spec import WEIGHTS_FILENAME

from .config import FinetuneConfig
from .distributed import DistContext
from .errors import TrainingError
from .features import FeatureTable
from .report import Timing
from .split import Split


@dataclass
class Trained:
    """What a recipe hands back. ``interrupted``: stopped on purpose before the end, nothing to
    register (``val_logits`` is then empty)."""

    net: Backbone
    val_logits: np.ndarray
    recipe: dict[str, Any]
    interrupted: bool = False


def load_parent_network(parent: StoredVersion) -> Backbone:
    """The parent version as PyTorch: its architecture with its stored weights."""
    weights = parent.file(WEIGHTS_FILENAME)
    if not weights.is_file() or WEIGHTS_FILENAME not in parent.spec.files:
        raise TrainingError(
            f"{parent.tag} has no {WEIGHTS_FILENAME} to start from; export it again "
            f"(backbones export {parent.spec.parent.removeprefix('catalog:')}) and fine-tune the new version"
        )
    return load_weights(build_architecture(parent.spec.architecture), weights)


def network_for_labels(parent: StoredVersion, labels: list[str], seed: int) -> tuple[Backbone, bool]:
    """The parent's network with a head for ``labels``: kept when the parent already classifies
    exactly these labels (fine-tuning a fine-tuned version again), else a new zero head. The
    second value says whether the head was kept."""
    net = load_parent_network(parent)
    if list(parent.spec.labels) == labels:
        return net, True
    torch.manual_seed(seed)
    net.replace_head(len(labels))
    torch.nn.init.zeros_(net.head.weight)  # start from uniform predictions: no random bias at step 0
    torch.nn.init.zeros_(net.head.bias)
    return net, False


def fit_linear(
    config: FinetuneConfig, parent: StoredVersion, table: FeatureTable, split: Split, timing: Timing
) -> Trained:
    """A logistic-regression head on the parent's frozen features (``table``), put on the parent's
    network (timed as ``fit`` and ``rebuild``)."""
    from .linear import fit_linear_head

    with timing.phase("fit"):
        x_train, _ = table.rows(split.train)
        x_val, _ = table.rows(split.val)
        head = fit_linear_head(
            x_train,
            split.targets(split.train),
            len(split.labels),
            class_weights=split.class_weights(),
            weight_decay=config.weight_decay,
            seed=config.seed,
        )
        val_logits = head.logits(x_val).astype(np.float32)
    with timing.phase("rebuild"):
        net = parent_with_head(parent, head.weight, head.bias)
    recipe = {"description": "linear probe: logistic regression (L-BFGS) on frozen features", **head.summary()}
    return Trained(net=net, val_logits=val_logits, recipe=recipe)


def parent_with_head(parent: StoredVersion, weight: np.ndarray, bias: np.ndarray) -> Backbone:
    """The parent as PyTorch with a linear head of these weights, in eval mode."""
    net = load_parent_network(parent)
    net.replace_head(len(bias))
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(weight))
        net.head.bias.copy_(torch.from_numpy(bias))
    net.eval()
    return net


def train_full_network(
    config: FinetuneConfig,
    parent: StoredVersion,
    split: Split,
    images: ImageLoader,
    ctx: DistContext,
    *,
    run_dir: Path,
    data: dict[str, Any],
    progress: bool,
) -> Trained:
    """Every layer of the parent's network (see :mod:`finetune.full`); ``data`` is the report's data
    section, whose fingerprints tie the run's checkpoints to these images."""
    from .full import FullTrainer, recipe_options

    net, kept_head = network_for_labels(parent, split.labels, config.seed)
    identity = {
        "backbone": parent.tag,
        "labels": split.labels,
        "train_fingerprint": data["train_fingerprint"],
        "val_fingerprint": data["val_fingerprint"],
    }
    trainer = FullTrainer(net, config, split, images, ctx, run_dir=run_dir, identity=identity)
    result = trainer.train(progress)
    recipe = {
        "description": "full fine-tune: AdamW, warmup + cosine, class-weighted cross-entropy",
        "options": recipe_options(config),
        "kept_parent_head": kept_head,
        "epochs_run": result.state.epoch,
        "best_epoch": result.state.best_epoch,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
        "amp_dtype": result.amp_dtype,
        "world_size": result.world_size,
        "history": result.state.history,
        "train_seconds_all_sessions": result.state.seconds,
        **result.details,
        "run_dir": str(run_dir),
    }
    return Trained(net=result.net, val_logits=result.val_logits, recipe=recipe, interrupted=result.interrupted)

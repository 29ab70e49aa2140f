"""The two recipes as one step of a run: each turns the checked split into a head for the split's
labels on the parent (the linear probe) or the parent's whole network retrained (the full
fine-tune), the validation logits, and the report's ``recipe`` section.

The probe needs no PyTorch (the run makes its version from the parent's graph: finetune/graft.py);
PyTorch is imported where a network is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import StoredVersion
from models.preprocess import ImageLoader
from models.spec import WEIGHTS_FILENAME

from .config import FinetuneConfig
from .distributed import DistContext
from .errors import TrainingError
from .features import FeatureTable
from .linear import LinearHead, fit_linear_head
from .report import Timing
from .split import Split
from .views import VIEW_SETS

if TYPE_CHECKING:
    from models.networks import Backbone


@dataclass
class Trained:
    """What a recipe hands back: the parent it started from, and either the whole network (the full
    fine-tune) or the new head (the linear probe). ``interrupted``: stopped on purpose before the
    end, nothing to register (``val_logits`` is then empty)."""

    parent: StoredVersion
    val_logits: np.ndarray
    recipe: dict[str, Any]
    net: Backbone | None = None
    head: LinearHead | None = None
    interrupted: bool = False


def load_parent_network(parent: StoredVersion) -> Backbone:
    """The parent version as PyTorch: its architecture with its stored weights."""
    from models.networks import build_architecture, load_weights

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
    import torch

    net = load_parent_network(parent)
    if list(parent.spec.labels) == labels:
        return net, True
    torch.manual_seed(seed)
    net.replace_head(len(labels))
    torch.nn.init.zeros_(net.head.weight)  # start from uniform predictions: no random bias at step 0
    torch.nn.init.zeros_(net.head.bias)
    return net, False


@dataclass
class _Probe:
    """One backbone's fitted head and its validation logits."""

    parent: StoredVersion
    head: LinearHead
    val_logits: np.ndarray
    seconds: float

    def row(self, split: Split, table: FeatureTable, chosen: bool) -> dict[str, Any]:
        """Its row of the report's table of backbones."""
        cv = self.head.chosen or {}
        return {
            "backbone": self.parent.tag,
            "feature_dim": self.parent.spec.feature_dim,
            "weight_decay": self.head.weight_decay,
            "cv_loss": cv.get("loss"),
            "cv_accuracy": cv.get("accuracy"),
            "val_accuracy": float((self.val_logits.argmax(1) == split.targets(split.val)).mean()),
            "features_seconds": table.stats.seconds,
            "fit_seconds": self.seconds,
            "chosen": chosen,
        }


def fit_linear(
    config: FinetuneConfig, parents: list[StoredVersion], tables: dict[str, FeatureTable], split: Split, timing: Timing
) -> Trained:
    """A logistic-regression head on each parent's frozen features (``tables``, by parent tag),
    timed as ``fit``. With several parents the one whose head has the lowest cross-validated loss
    on the training split is kept: the validation split plays no part in the choice, so its
    accuracy stays an unbiased measurement (and the promotion gate compares on it)."""
    views = VIEW_SETS[config.views]
    probes: list[_Probe] = []
    with timing.phase("fit"):
        for parent in parents:
            t = time.perf_counter()
            table = tables[parent.tag]
            head = fit_linear_head(
                table.rows(split.train)[0],
                split.targets(split.train),
                len(split.labels),
                views=[table.rows(split.train, v)[0] for v in views[1:]],
                class_weights=split.class_weights(),
                weight_decay=config.weight_decay,
                score_given=len(parents) > 1,
                seed=config.seed,
            )
            val_logits = head.logits(table.rows(split.val)[0]).astype(np.float32)
            probes.append(_Probe(parent, head, val_logits, time.perf_counter() - t))
    best = probes[0] if len(probes) == 1 else _best(probes)
    recipe: dict[str, Any] = {
        "description": "linear probe: logistic regression (L-BFGS) on frozen features",
        **best.head.summary(),
        "views": list(views),
        "class_weighting": "each class weighs the same in the loss and in the cross-validated loss",
    }
    if len(probes) > 1:
        recipe["backbones"] = [p.row(split, tables[p.parent.tag], p is best) for p in probes]
        recipe["backbone_choice"] = (
            f"{best.parent.tag}: the lowest out-of-fold log loss on the training split of the {len(probes)} "
            "backbones (the validation split plays no part in the choice)"
        )
    return Trained(parent=best.parent, val_logits=best.val_logits, recipe=recipe, head=best.head)


def _best(probes: list[_Probe]) -> _Probe:
    """The probe whose chosen penalty has the lowest cross-validated loss (ties: the first listed)."""
    losses = [p.head.chosen["loss"] if p.head.chosen else None for p in probes]
    if None in losses:
        raise TrainingError(
            "comparing backbones needs cross-validation on the training split: at least 2 training images per class"
        )
    return probes[losses.index(min(losses))]  # type: ignore[type-var]


def parent_with_head(parent: StoredVersion, weight: np.ndarray, bias: np.ndarray) -> Backbone:
    """The parent as PyTorch with a linear head of these weights, in eval mode."""
    import torch

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
    return Trained(
        parent=parent, val_logits=result.val_logits, recipe=recipe, net=result.net, interrupted=result.interrupted
    )

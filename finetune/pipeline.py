"""One fine-tuning run, end to end: data -> checks -> split -> train -> evaluate -> register -> promote.

Both recipes end the same way: one PyTorch :class:`~models.networks.Backbone` (the parent's body
and a head for the dataset's labels) exported through :func:`models.export.register_backbone`, so
the new version is verified like any export and holds ONE ONNX graph with ``logits`` and
``features``, its PyTorch weights (a later fine-tune starts from them), ``report.json`` and
``confusion.png``.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import Registry, Settings, StoredVersion, get_settings
from models.export import ensure_version, register_backbone
from models.networks import Backbone, build_architecture, load_weights
from models.preprocess import ImageLoader
from models.runtime import available_cores
from models.spec import WEIGHTS_FILENAME, Architecture

from .config import FinetuneConfig
from .data import ImageSet, check_readable, fingerprint, odd_formats, scan_dataset
from .distributed import DistContext, barrier
from .errors import TrainingError
from .features import extract_features
from .metrics import classification_report
from .promote import Promotion, promote_if_better
from .report import spec_training, write_report_files
from .split import Split, make_split, precheck

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """``stored`` is the new version (``None`` on processes other than rank 0, and when the run
    stopped early on purpose: ``interrupted``). ``report`` is what ``--json`` prints."""

    report: dict[str, Any]
    stored: StoredVersion | None
    promotion: Promotion | None
    interrupted: bool = False


def run_dir_for(config: FinetuneConfig, registry: Registry) -> Path:
    return (config.run_dir or registry.own_dir("runs", config.name)).resolve()


def load_parent_network(parent: StoredVersion) -> Backbone:
    """The parent version as PyTorch: its architecture with its stored weights."""
    weights = parent.file(WEIGHTS_FILENAME)
    if not weights.is_file() or WEIGHTS_FILENAME not in parent.spec.files:
        raise TrainingError(
            f"{parent.tag} has no {WEIGHTS_FILENAME} to start from; export it again "
            f"(backbones export {parent.spec.parent.removeprefix('catalog:')}) and fine-tune the new version"
        )
    return load_weights(build_architecture(parent.spec.architecture), weights)


def _usable(image_set: ImageSet, bad: dict[str, str]) -> ImageSet:
    return image_set.without(bad) if bad else image_set


def _data_section(train_set: ImageSet, val_set: ImageSet | None, split: Split, warnings: list[str]) -> dict[str, Any]:
    skipped = [u.to_dict() for u in train_set.unreadable] + [
        {**u.to_dict(), "set": "validation"} for u in (val_set.unreadable if val_set else [])
    ]
    used_from_data = split.train + (split.val if val_set is None else [])
    odd = odd_formats(train_set.samples + (val_set.samples if val_set else []))
    if odd:
        shown = ", ".join(s.rel for s in odd[:5])
        msg = (
            f"{len(odd)} file(s) are in a format rare in this dataset ({', '.join(sorted({s.format for s in odd}))}): "
            f"{shown}; placeholders saved by crawlers look like this, have a look at them"
        )
        log.warning("%s", msg)
        warnings.append(msg)
    formats: dict[str, int] = {}
    for s in split.train + split.val:
        formats[s.format] = formats.get(s.format, 0) + 1
    return {
        "source": str(train_set.source),
        "kind": train_set.kind,
        "val_source": str(val_set.source) if val_set else None,
        "fingerprint": fingerprint(used_from_data),
        "train_fingerprint": fingerprint(split.train),
        "val_fingerprint": fingerprint(split.val),
        "counts": {"train": split.counts(split.train), "val": split.counts(split.val)},
        "formats": formats,
        "skipped": skipped,
        "removed": split.removed,
        "ignored_count": len(train_set.ignored) + (len(val_set.ignored) if val_set else 0),
        "odd_format_files": [s.rel for s in odd],
    }


def _new_network(parent: StoredVersion, labels: list[str], seed: int) -> tuple[Backbone, bool]:
    """The parent's network with a head for ``labels``: kept when the parent already classifies
    exactly these labels (fine-tuning a fine-tuned version again), else a new zero head."""
    net = load_parent_network(parent)
    if list(parent.spec.labels) == labels:
        return net, True
    torch.manual_seed(seed)
    net.replace_head(len(labels))
    torch.nn.init.zeros_(net.head.weight)  # start from uniform predictions: no random bias at step 0
    torch.nn.init.zeros_(net.head.bias)
    return net, False


def finetune(
    config: FinetuneConfig,
    *,
    registry: Registry | None = None,
    settings: Settings | None = None,
    ctx: DistContext | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Run ``config``; returns the report and the registered version (see :class:`FinetuneResult`).

    Raises :class:`~finetune.errors.DatasetError` / :class:`~finetune.errors.TrainingError` (and the
    registry's errors) with what to fix; nothing is registered then.
    """
    settings = settings or get_settings()
    registry = registry or Registry(settings=settings)
    ctx = ctx or DistContext()
    if config.mode == "linear" and ctx.distributed:
        raise TrainingError("the linear probe runs in one process; start it without torchrun (or use --mode full)")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    warnings: list[str] = []
    cores = available_cores()

    t = time.perf_counter()
    train_set = scan_dataset(config.data, workers=cores)
    val_set = scan_dataset(config.val_dir, workers=cores) if config.val_dir else None
    precheck(train_set)
    timing["scan"] = time.perf_counter() - t
    t = time.perf_counter()
    # one process exports a catalog model on first use; the others then find it registered
    parent = ensure_version(config.backbone, registry) if ctx.is_main else None
    barrier(ctx)
    if parent is None:
        parent = ensure_version(config.backbone, registry)
    timing["backbone"] = time.perf_counter() - t

    every = train_set.samples + (val_set.samples if val_set else [])

    t = time.perf_counter()
    table = None
    if config.mode == "linear":
        # the feature pass decodes every new image anyway: it is the readability check too
        table = extract_features(
            parent,
            every,
            registry=registry,
            settings=settings,
            batch_size=config.batch_size,
            workers=config.workers,
            progress=progress,
        )
        bad = table.failed
        timing["features"] = time.perf_counter() - t
    else:
        loader = ImageLoader(
            parent.spec.preprocess, max_pixels=settings.max_image_pixels, draft=settings.draft_decoding
        )
        bad = check_readable(every, loader.decode, workers=config.workers or cores)
        timing["readability"] = time.perf_counter() - t
    train_set, val_set = _usable(train_set, bad), (_usable(val_set, bad) if val_set else None)
    for u in train_set.unreadable + (val_set.unreadable if val_set else []):
        log.warning("skipping %s: %s", u.rel, u.reason)
    n_skipped = len(train_set.unreadable) + (len(val_set.unreadable) if val_set else 0)
    if n_skipped:
        msg = f"{n_skipped} unreadable file(s) skipped (listed in the report)"
        log.warning("%s", msg)
        warnings.append(msg)

    split = make_split(
        train_set, val_set, val_fraction=config.val_fraction, seed=config.seed, imbalance_ratio=config.imbalance_ratio
    )
    warnings.extend(split.warnings)
    labels = split.labels
    y_train, y_val = split.targets(split.train), split.targets(split.val)
    data = _data_section(train_set, val_set, split, warnings)
    class_weights = split.class_weights()
    report: dict[str, Any] = {
        "name": config.name,
        "mode": config.mode,
        "backbone": parent.tag,
        "labels": labels,
        "data": data,
        "split": {
            "seed": config.seed,
            "val_fraction": split.val_fraction,
            "val_dir": str(config.val_dir) if config.val_dir else None,
        },
        "class_weights": dict(zip(labels, class_weights, strict=True)),
    }

    t = time.perf_counter()
    if config.mode == "linear":
        from .linear import fit_linear_head

        assert table is not None
        x_train, _ = table.rows(split.train)
        x_val, _ = table.rows(split.val)
        head = fit_linear_head(
            x_train,
            y_train,
            len(labels),
            class_weights=class_weights,
            weight_decay=config.weight_decay,
            seed=config.seed,
        )
        val_logits = head.logits(x_val).astype(np.float32)
        timing["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        net = load_parent_network(parent)
        net.replace_head(len(labels))
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(head.weight))
            net.head.bias.copy_(torch.from_numpy(head.bias))
        net.eval()
        report["recipe"] = {
            "description": "linear probe: logistic regression (L-BFGS) on frozen features",
            **head.summary(),
        }
        report["features"] = table.stats.to_dict()
        timing["rebuild"] = time.perf_counter() - t  # the parent as PyTorch, with the new head
        interrupted = False
    else:
        from .full import DEFAULT_WEIGHT_DECAY, FullOptions, train_full

        net, kept_head = _new_network(parent, labels, config.seed)
        opts = FullOptions(
            epochs=config.epochs,
            lr=config.lr,
            backbone_lr_scale=config.backbone_lr_scale,
            weight_decay=config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY,
            warmup_epochs=config.warmup_epochs,
            freeze_epochs=config.freeze_epochs,
            patience=config.patience,
            label_smoothing=config.label_smoothing,
            batch_size=config.batch_size,
            seed=config.seed,
            amp=config.amp,
            workers=config.workers,
            stop_after_epochs=config.stop_after_epochs,
        )
        run_dir = run_dir_for(config, registry)
        result = train_full(
            net,
            pre=parent.spec.preprocess,
            train=split.train,
            train_targets=y_train,
            val=split.val,
            val_targets=y_val,
            class_weights=class_weights,
            opts=opts,
            ctx=ctx,
            run_dir=run_dir,
            identity={
                "backbone": parent.tag,
                "labels": labels,
                "train_fingerprint": data["train_fingerprint"],
                "val_fingerprint": data["val_fingerprint"],
            },
            resume=config.resume,
            max_pixels=settings.max_image_pixels,
            draft=settings.draft_decoding,
            progress=progress,
        )
        net, val_logits, interrupted = result.net, result.val_logits, result.interrupted
        report["recipe"] = {
            "description": "full fine-tune: AdamW, warmup + cosine, class-weighted cross-entropy",
            "options": opts.to_dict(),
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
        timing["train"] = time.perf_counter() - t
    report["warnings"] = warnings
    report["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": cores,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }

    if interrupted:
        report["timing"] = {**timing, "total": time.perf_counter() - t_start}
        report["interrupted"] = True
        return FinetuneResult(report=report, stored=None, promotion=None, interrupted=True)

    report["metrics"] = classification_report(val_logits, y_val, labels, top_k=config.top_k)
    if not ctx.is_main:
        return FinetuneResult(report=report, stored=None, promotion=None)

    report["timing"] = {**timing, "before_export": time.perf_counter() - t_start}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="backbones-report-") as tmp:
        files = write_report_files(report, Path(tmp))
        parent_arch = parent.spec.architecture
        stored = register_backbone(
            net,
            registry=registry,
            name=config.name,
            preprocess=parent.spec.preprocess,
            labels=labels,
            parent=parent.tag,
            architecture=Architecture(family=parent_arch.family, name=parent_arch.name, num_classes=len(labels)),
            source={"finetune": config.mode, "backbone": parent.tag},
            training=spec_training(report),
            verify_sources=[s.path for s in split.val[:16]],
            extra_files=files,
        )
    timing["export"] = time.perf_counter() - t
    log.info("registered %s", stored.tag)

    promotion = None
    if config.promote_if_better:
        t = time.perf_counter()
        promotion = promote_if_better(
            registry, stored, config.promote_if_better, split.val, settings=settings, batch_size=config.batch_size
        )
        timing["promotion"] = time.perf_counter() - t
        log.info("%s", promotion.line())
    if config.mode == "full":
        from . import checkpoint

        checkpoint.clear(run_dir_for(config, registry))
    timing["total"] = time.perf_counter() - t_start
    report["timing"] = timing
    report["model"] = stored.tag
    report["version_path"] = str(stored.path)
    report["promotion"] = promotion.to_dict() if promotion else None
    return FinetuneResult(report=report, stored=stored, promotion=promotion)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import Registry, Settings, StoredVersion, get_settings
from models.export import ensure_version, register_backbone
from models.preprocess import ImageLoader
from models.runtime import available_cores
from models.spec import Architecture

from . import checkpoint
from .config import FinetuneConfig
from .data import ImageSet, check_readable, odd_formats, scan_dataset
from .distributed import DistContext, barrier
from .errors import TrainingError
from .features import FeatureTable, extract_features
from .metrics import classification_report
from .promote import Promotion, promote_if_better
from .recipes import Trained, fit_linear, train_full_network
from .report import Timing, data_section, spec_training, write_report_files
from .split import Split, make_split, precheck

log = logging.getLogger(__name__)

# validation images the export's PyTorch-vs-ONNX check runs on
VERIFY_IMAGES = 16


@dataclass
class FinetuneResult:
    """``stored`` is the new version (``None`` on processes other than rank 0, and when the run
    stopped early on purpose: ``interrupted``). ``report`` is what ``--json`` prints."""

    report: dict[str, Any]
    stored: StoredVersion | None
    promotion: Promotion | None
    interrupted: bool = False


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
    run = FinetuneRun(config, registry=registry, settings=settings, ctx=ctx)
    train_set, val_set = run.scan()
    parent = run.parent_version()
    table, train_set, val_set = run.decode_once(parent, train_set, val_set, progress=progress)
    split, report = run.split(parent, train_set, val_set)
    trained = run.train(parent, split, table, report, progress=progress)
    report["warnings"] = run.warnings
    report["environment"] = environment(run.cores)
    if trained.interrupted:
        report["timing"] = {**run.timing.seconds, "total": run.timing.elapsed()}
        report["interrupted"] = True
        return FinetuneResult(report=report, stored=None, promotion=None, interrupted=True)

    report["metrics"] = classification_report(
        trained.val_logits, split.targets(split.val), split.labels, top_k=config.top_k
    )
    if not run.ctx.is_main:
        return FinetuneResult(report=report, stored=None, promotion=None)
    stored = run.register(parent, trained, split, report)
    promotion = run.promote(stored, split)
    run.finish(report, stored, promotion)
    return FinetuneResult(report=report, stored=stored, promotion=promotion)


def environment(cores: int) -> dict[str, Any]:
    """The report's ``environment`` section."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": cores,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class FinetuneRun:
    """The steps of one run (see :func:`finetune` for their order), sharing its config, registry,
    settings and process context, the warnings for the report and the time each step took."""

    def __init__(
        self,
        config: FinetuneConfig,
        *,
        registry: Registry | None = None,
        settings: Settings | None = None,
        ctx: DistContext | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or get_settings()
        self.registry = registry or Registry(settings=self.settings)
        self.ctx = ctx or DistContext()
        if config.mode == "linear" and self.ctx.distributed:
            raise TrainingError("the linear probe runs in one process; start it without torchrun (or use --mode full)")
        self.run_dir = (config.run_dir or self.registry.own_dir("runs", config.name)).resolve()
        self.timing = Timing()
        self.warnings: list[str] = []
        self.cores = available_cores()

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def images(self, parent: StoredVersion) -> ImageLoader:
        """Decoding with the parent's preprocessing and the project's decode settings."""
        s = self.settings
        return ImageLoader(parent.spec.preprocess, max_pixels=s.max_image_pixels, draft=s.draft_decoding)

    def scan(self) -> tuple[ImageSet, ImageSet | None]:
        """The training and validation sets as listed (nothing decoded yet), and the checks that
        need no decoding, so that a wrong folder fails before any model is loaded."""
        c = self.config
        with self.timing.phase("scan"):
            train_set = scan_dataset(c.data, workers=self.cores)
            val_set = scan_dataset(c.val_dir, workers=self.cores) if c.val_dir else None
            precheck(train_set)
        return train_set, val_set

    def parent_version(self) -> StoredVersion:
        """The backbone to start from; one process exports a catalog model on first use, the
        others then find it registered."""
        with self.timing.phase("backbone"):
            parent = ensure_version(self.config.backbone, self.registry) if self.ctx.is_main else None
            barrier(self.ctx)
            return parent or ensure_version(self.config.backbone, self.registry)

    def decode_once(
        self, parent: StoredVersion, train_set: ImageSet, val_set: ImageSet | None, *, progress: bool
    ) -> tuple[FeatureTable | None, ImageSet, ImageSet | None]:
        """Decode every image once and set aside those that fail: the linear probe's feature pass
        (which returns the features) or the full fine-tune's readability pass."""
        every = train_set.samples + (val_set.samples if val_set else [])
        table = None
        if self.config.mode == "linear":
            # the feature pass decodes every new image anyway: it is the readability check too
            with self.timing.phase("features"):
                table = extract_features(
                    parent,
                    every,
                    registry=self.registry,
                    settings=self.settings,
                    batch_size=self.config.batch_size,
                    workers=self.config.workers,
                    progress=progress,
                )
            bad = table.failed
        else:
            with self.timing.phase("readability"):
                bad = check_readable(every, self.images(parent).decode, workers=self.config.workers or self.cores)
        train_set, val_set = train_set.without(bad), (val_set.without(bad) if val_set else None)
        unreadable = train_set.unreadable + (val_set.unreadable if val_set else [])
        for u in unreadable:
            log.warning("skipping %s: %s", u.rel, u.reason)
        if unreadable:
            self.warn(f"{len(unreadable)} unreadable file(s) skipped (listed in the report)")
        return table, train_set, val_set

    def split(
        self, parent: StoredVersion, train_set: ImageSet, val_set: ImageSet | None
    ) -> tuple[Split, dict[str, Any]]:
        """The checked split, and the report's sections on the run and its data."""
        c = self.config
        split = make_split(
            train_set, val_set, val_fraction=c.val_fraction, seed=c.seed, imbalance_ratio=c.imbalance_ratio
        )
        self.warnings.extend(split.warnings)
        odd = odd_formats(train_set.samples + (val_set.samples if val_set else []))
        if odd:
            formats = ", ".join(sorted({s.format for s in odd}))
            self.warn(
                f"{len(odd)} file(s) are in a format rare in this dataset ({formats}): "
                f"{', '.join(s.rel for s in odd[:5])}; placeholders saved by crawlers look like this, have a look at them"
            )
        report: dict[str, Any] = {
            "name": c.name,
            "mode": c.mode,
            "backbone": parent.tag,
            "labels": split.labels,
            "data": data_section(train_set, val_set, split, odd),
            "split": {
                "seed": c.seed,
                "val_fraction": split.val_fraction,
                "val_dir": str(c.val_dir) if c.val_dir else None,
            },
            "class_weights": dict(zip(split.labels, split.class_weights(), strict=True)),
        }
        return split, report

    def train(
        self, parent: StoredVersion, split: Split, table: FeatureTable | None, report: dict[str, Any], *, progress: bool
    ) -> Trained:
        """The recipe of ``config.mode``; adds its sections to ``report``."""
        if self.config.mode == "linear":
            assert table is not None
            trained = fit_linear(self.config, parent, table, split, self.timing)
            report["recipe"] = trained.recipe
            report["features"] = table.stats.to_dict()
            return trained
        with self.timing.phase("train"):
            trained = train_full_network(
                self.config,
                parent,
                split,
                self.images(parent),
                self.ctx,
                run_dir=self.run_dir,
                data=report["data"],
                progress=progress,
            )
            report["recipe"] = trained.recipe
        return trained

    def register(self, parent: StoredVersion, trained: Trained, split: Split, report: dict[str, Any]) -> StoredVersion:
        """Export, verify and register the new version with its report files."""
        report["timing"] = {**self.timing.seconds, "before_export": self.timing.elapsed()}
        arch = parent.spec.architecture
        with self.timing.phase("export"), tempfile.TemporaryDirectory(prefix="backbones-report-") as tmp:
            files = write_report_files(report, Path(tmp))
            stored = register_backbone(
                trained.net,
                registry=self.registry,
                name=self.config.name,
                preprocess=parent.spec.preprocess,
                labels=split.labels,
                parent=parent.tag,
                architecture=Architecture(family=arch.family, name=arch.name, num_classes=len(split.labels)),
                source={"finetune": self.config.mode, "backbone": parent.tag},
                training=spec_training(report),
                verify_sources=[s.path for s in split.val[:VERIFY_IMAGES]],
                extra_files=files,
            )
        log.info("registered %s", stored.tag)
        return stored

    def promote(self, stored: StoredVersion, split: Split) -> Promotion | None:
        """Move ``config.promote_if_better`` to ``stored`` if it is better on the same validation images."""
        alias = self.config.promote_if_better
        if not alias:
            return None
        with self.timing.phase("promotion"):
            promotion = promote_if_better(
                self.registry, stored, alias, split.val, settings=self.settings, batch_size=self.config.batch_size
            )
        log.info("%s", promotion.line())
        return promotion

    def finish(self, report: dict[str, Any], stored: StoredVersion, promotion: Promotion | None) -> None:
        """Clear the registered run's checkpoints and complete the report."""
        if self.config.mode == "full":
            checkpoint.clear(self.run_dir)
        self.timing.seconds["total"] = self.timing.elapsed()
        report["timing"] = self.timing.seconds
        report["model"] = stored.tag
        report["version_path"] = str(stored.path)
        report["promotion"] = promotion.to_dict() if promotion else None

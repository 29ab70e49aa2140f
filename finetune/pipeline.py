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
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models import Registry, Settings, StoredVersion, get_settings
from models.export import ensure_version, register_backbone
from models.preprocess import ImageLoader
from models.runtime import available_cores
from models.spec import Architecture

from .config import FinetuneConfig
from .data import ImageSet, check_readable, odd_formats, scan_dataset
from .distributed import DistContext, barrier, pick_device
from .errors import TrainingError
from .features import FeatureTable, extract_features
from .graft import graft_refusal, register_grafted
from .metrics import classification_report
from .promote import Promotion, promote_if_better
from .recipes import Trained, fit_linear, parent_with_head, train_full_network
from .report import Timing, data_section, spec_training, write_report_files
from .report_html import html_report_path, misclassified, write_html_report
from .split import Split, make_split, precheck

if TYPE_CHECKING:
    from models.networks import Backbone
from .views import VIEW_SETS

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
    parents = run.parent_versions()
    tables, train_set, val_set = run.decode_once(parents, train_set, val_set, progress=progress)
    split, report = run.split(train_set, val_set)
    trained = run.train(parents, split, tables, report, progress=progress)
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
    stored = run.register(trained, split, tables, report)
    promotion = run.promote(stored, split)
    run.finish(report, stored, promotion)
    run.write_html(report, stored, trained, split)
    return FinetuneResult(report=report, stored=stored, promotion=promotion)


def environment(cores: int) -> dict[str, Any]:
    """The report's ``environment`` section (``cuda``: the GPU PyTorch saw, when the run used
    PyTorch at all; the linear probe need not)."""
    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "cores": cores,
        "cuda": torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None,
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
        # a run in this one process trains on the device asked for (the probe trains on none)
        self.ctx = ctx or DistContext(device_name=str(pick_device(config.device)) if config.mode == "full" else "cpu")
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

    def parent_versions(self) -> list[StoredVersion]:
        """The backbones to start from (one, unless the linear probe compares several); one process
        exports a catalog model on first use, the others then find it registered."""
        refs = self.config.backbones
        with self.timing.phase("backbone"):
            if self.ctx.is_main:
                for ref in refs:
                    ensure_version(ref, self.registry)
            barrier(self.ctx)
            parents = [ensure_version(ref, self.registry) for ref in refs]
        tags = [p.tag for p in parents]
        if len(set(tags)) != len(tags):
            raise TrainingError(f"--backbone {self.config.backbone!r} names one version twice ({', '.join(tags)})")
        return parents

    def decode_once(
        self, parents: list[StoredVersion], train_set: ImageSet, val_set: ImageSet | None, *, progress: bool
    ) -> tuple[dict[str, FeatureTable], ImageSet, ImageSet | None]:
        """Decode every image once and set aside those that fail: the linear probe's feature pass
        for each backbone (which returns the features, by parent tag) or the full fine-tune's
        readability pass."""
        every = train_set.samples + (val_set.samples if val_set else [])
        tables: dict[str, FeatureTable] = {}
        bad: dict[str, str] = {}
        if self.config.mode == "linear":
            # the feature pass decodes every new image anyway: it is the readability check too
            with self.timing.phase("features"):
                for parent in parents:
                    tables[parent.tag] = extract_features(
                        parent,
                        every,
                        registry=self.registry,
                        settings=self.settings,
                        views=VIEW_SETS[self.config.views],
                        batch_size=self.config.batch_size,
                        workers=self.config.workers,
                        progress=progress,
                    )
                    bad.update(tables[parent.tag].failed)
        else:
            with self.timing.phase("readability"):
                images = self.images(parents[0])
                bad = check_readable(every, images.decode, workers=self.config.workers or self.cores)
        train_set, val_set = train_set.without(bad), (val_set.without(bad) if val_set else None)
        unreadable = train_set.unreadable + (val_set.unreadable if val_set else [])
        for u in unreadable:
            log.warning("skipping %s: %s", u.rel, u.reason)
        if unreadable:
            self.warn(f"{len(unreadable)} unreadable file(s) skipped (listed in the report)")
        return tables, train_set, val_set

    def split(self, train_set: ImageSet, val_set: ImageSet | None) -> tuple[Split, dict[str, Any]]:
        """The checked split, and the report's sections on the run and its data (``backbone`` is
        filled in by :meth:`train`)."""
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
            "backbone": None,
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
        self,
        parents: list[StoredVersion],
        split: Split,
        tables: dict[str, FeatureTable],
        report: dict[str, Any],
        *,
        progress: bool,
    ) -> Trained:
        """The recipe of ``config.mode``; adds its sections to ``report``."""
        if self.config.mode == "linear":
            trained = fit_linear(self.config, parents, tables, split, self.timing)
            report["features"] = tables[trained.parent.tag].stats.to_dict()
        else:
            with self.timing.phase("train"):
                trained = train_full_network(
                    self.config,
                    parents[0],
                    split,
                    self.images(parents[0]),
                    self.ctx,
                    run_dir=self.run_dir,
                    data=report["data"],
                    progress=progress,
                )
        report["backbone"] = trained.parent.tag
        report["recipe"] = trained.recipe
        return trained

    def register(
        self, trained: Trained, split: Split, tables: dict[str, FeatureTable], report: dict[str, Any]
    ) -> StoredVersion:
        """Export (or graft: :mod:`finetune.graft`), verify and register the new version with its
        report files."""
        parent, head = trained.parent, trained.head
        refusal = graft_refusal(parent) if head is not None else "a full fine-tune changes every layer"
        graph = "the parent's graph with the new head" if refusal is None else f"exported from PyTorch ({refusal})"
        report["recipe"]["graph"] = graph
        report["timing"] = {**self.timing.seconds, "before_export": self.timing.elapsed()}
        with self.timing.phase("export"), tempfile.TemporaryDirectory(prefix="backbones-report-") as tmp:
            files = write_report_files(report, Path(tmp))
            if head is not None and refusal is None:
                stored = register_grafted(
                    parent,
                    head,
                    registry=self.registry,
                    name=self.config.name,
                    labels=split.labels,
                    training=spec_training(report),
                    verify_samples=split.val[:VERIFY_IMAGES],
                    table=tables[parent.tag],
                    loader=self.images(parent),
                    extra_files=files,
                )
            else:
                net = trained.net if head is None else parent_with_head(parent, head.weight, head.bias)
                assert net is not None
                stored = self._export(net, parent, split, report, files)
        log.info("registered %s", stored.tag)
        return stored

    def _export(
        self, net: Backbone, parent: StoredVersion, split: Split, report: dict[str, Any], files: dict[str, Path]
    ) -> StoredVersion:
        arch = parent.spec.architecture
        return register_backbone(
            net,
            registry=self.registry,
            name=self.config.name,
            preprocess=parent.spec.preprocess,
            labels=split.labels,
            parent=parent.tag,
            architecture=Architecture(family=arch.family, name=arch.name, num_classes=len(split.labels)),
            source={"finetune": self.config.mode, "backbone": parent.tag},
            training=spec_training(report),
            verify_sources=[s.source() for s in split.val[:VERIFY_IMAGES]],
            extra_files=files,
        )

    def promote(self, stored: StoredVersion, split: Split) -> Promotion | None:
        """Move ``config.promote_if_better`` to ``stored`` if it is better on the same validation images."""
        alias = self.config.promote_if_better
        if not alias:
            return None
        with self.timing.phase("promotion"):
            promotion = promote_if_better(
                self.registry,
                stored,
                alias,
                split.val,
                min_images=self.config.gate_min_images,
                force=self.config.force_promotion,
                settings=self.settings,
                batch_size=self.config.batch_size,
            )
        log.info("%s", promotion.line())
        return promotion

    def finish(self, report: dict[str, Any], stored: StoredVersion, promotion: Promotion | None) -> None:
        """Clear the registered run's checkpoints and complete the report."""
        if self.config.mode == "full":
            from . import checkpoint

            checkpoint.clear(self.run_dir)
        self.timing.seconds["total"] = self.timing.elapsed()
        report["timing"] = self.timing.seconds
        report["model"] = stored.tag
        report["version_path"] = str(stored.path)
        report["promotion"] = promotion.to_dict() if promotion else None

    def write_html(self, report: dict[str, Any], stored: StoredVersion, trained: Trained, split: Split) -> None:
        """The HTML report (:mod:`finetune.report_html`) beside the run; its path goes into
        ``report`` (the version is registered by now: a failure here is a warning)."""
        path = html_report_path(self.registry, stored.spec.name, stored.spec.version)
        loader = self.images(trained.parent)
        try:
            misses = misclassified(split.val, trained.val_logits, split.labels, loader, workers=self.cores)
            report["report_html"] = str(write_html_report(path, report, misses))
        except OSError as e:
            self.warn(f"the HTML report could not be written to {path}: {e}")

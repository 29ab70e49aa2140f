"""From scanned image sets to a checked train/validation split.

Checks, in order: exact duplicates inside a set are collapsed (and dropped where their labels
disagree); every class must keep at least one usable image and there must be two classes; with a
separate validation set, files present in both (same path, or same content) leave the training
side; without one, each class is split in a seeded, stratified way. A strong imbalance is warned
about; the training recipes weight the loss by :meth:`Split.class_weights`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import config_default
from .data import ImageSet, Sample
from .errors import DatasetError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """The checked split. ``labels`` are the training classes, sorted: index i is class i."""

    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    seed: int
    val_fraction: float | None  # None when validation came from its own folder/manifest
    warnings: list[str] = field(default_factory=list)
    removed: list[dict[str, str]] = field(default_factory=list)  # duplicates, conflicts, overlap

    def targets(self, samples: Sequence[Sample]) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.asarray([index[s.label] for s in samples], dtype=np.int64)

    def counts(self, samples: Sequence[Sample]) -> dict[str, int]:
        c = Counter(s.label for s in samples)
        return {label: c.get(label, 0) for label in self.labels}

    def class_weights(self) -> list[float]:
        """``n / (classes * n_c)`` per class on the training split: every class weighs the same in
        the loss however many images it has (1.0 each when the classes are balanced)."""
        counts = self.counts(self.train)
        n, k = len(self.train), len(self.labels)
        return [n / (k * counts[label]) for label in self.labels]


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def _dedupe(samples: Sequence[Sample], where: str, removed: list[dict[str, str]], warnings: list[str]) -> list[Sample]:
    """One sample per content; contents that appear under two labels are dropped altogether."""
    by_sha: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_sha[s.sha256].append(s)
    keep: list[Sample] = []
    duplicates = conflicts = 0
    for group in by_sha.values():
        group = sorted(group, key=lambda s: s.rel)
        labels = sorted({s.label for s in group})
        if len(labels) > 1:
            conflicts += len(group)
            for s in group:
                removed.append(
                    {"path": s.rel, "label": s.label, "reason": f"same content labelled {' and '.join(labels)}"}
                )
            continue
        keep.append(group[0])
        for s in group[1:]:
            duplicates += 1
            removed.append({"path": s.rel, "label": s.label, "reason": f"same content as {group[0].rel}"})
    if duplicates:
        _warn(warnings, f"{where}: {duplicates} file(s) repeat another file's content; each content is used once")
    if conflicts:
        _warn(warnings, f"{where}: {conflicts} file(s) have the same content under different labels; they are left out")
    return sorted(keep, key=lambda s: s.rel)


def _check_classes(image_set: ImageSet, samples: Sequence[Sample], where: str) -> None:
    counts = Counter(s.label for s in samples)
    bad_counts = Counter(u.label for u in image_set.unreadable)
    empty = [c for c in image_set.classes if counts.get(c, 0) == 0]
    if empty:
        details = ", ".join(
            f"'{c}'" + (f" ({bad_counts[c]} unreadable file(s))" if bad_counts.get(c) else " (no image files)")
            for c in empty
        )
        raise DatasetError(
            f"{where}: class {details} has no usable image; add images to it or remove it from {image_set.source}"
        )
    if len(image_set.classes) < 2:
        found = ", ".join(f"'{c}'" for c in image_set.classes) or "none"
        raise DatasetError(
            f"{where}: fine-tuning needs at least two classes, found {len(image_set.classes)} ({found}) in "
            f"{image_set.source}; an ImageFolder holds one sub-folder per class"
        )


def precheck(image_set: ImageSet, where: str = "training data") -> None:
    """The checks that need no decoding (two classes, none without image files), so that a wrong
    folder fails in a second, before any model is loaded."""
    _check_classes(image_set, image_set.samples, where)


def _class_rng(seed: int, label: str) -> np.random.Generator:
    # one stream per class: adding a class or an image elsewhere does not reshuffle this class
    digest = hashlib.sha256(f"{seed}\0{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def stratified_split(
    samples: Sequence[Sample], labels: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Per class, ``round(val_fraction * n)`` images (at least 1, at most n - 1) go to validation,
    chosen by a generator seeded from ``seed`` and the class name."""
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in labels:
        group = sorted(by_label[label], key=lambda s: s.rel)
        if len(group) < 2:
            raise DatasetError(
                f"class '{label}' has {len(group)} usable image; a validation split needs at least 2 per class "
                "(add images, or pass a validation set with --val-dir)"
            )
        n_val = min(max(round(val_fraction * len(group)), 1), len(group) - 1)
        order = _class_rng(seed, label).permutation(len(group))
        val.extend(group[i] for i in sorted(order[:n_val]))
        train.extend(group[i] for i in sorted(order[n_val:]))
    return train, val


def make_split(
    train_set: ImageSet,
    val_set: ImageSet | None = None,
    *,
    val_fraction: float = config_default("val_fraction"),
    seed: int = config_default("seed"),
    imbalance_ratio: float = config_default("imbalance_ratio"),
) -> Split:
    """Check ``train_set`` (and ``val_set``) and split them; raises :class:`DatasetError` with what
    to fix when the data cannot be used."""
    warnings: list[str] = []
    removed: list[dict[str, str]] = []
    train = _dedupe(train_set.samples, "training data", removed, warnings)
    _check_classes(train_set, train, "training data")
    labels = sorted(train_set.classes)

    if val_set is None:
        train, val = stratified_split(train, labels, val_fraction, seed)
        fraction: float | None = val_fraction
    else:
        fraction = None
        val = _dedupe(val_set.samples, "validation data", removed, warnings)
        unknown = sorted({s.label for s in val} - set(labels))
        if unknown:
            raise DatasetError(
                f"the validation data has classes the training data lacks: {', '.join(unknown)}; "
                f"training classes: {', '.join(labels)}"
            )
        if not val:
            raise DatasetError(f"the validation data {val_set.source} has no usable image")
        val_paths = {s.identity() for s in val}
        val_shas = {s.sha256 for s in val}
        overlap = [s for s in train if s.identity() in val_paths or s.sha256 in val_shas]
        if overlap:
            for s in overlap:
                same = "the same file" if s.identity() in val_paths else "the same content"
                removed.append({"path": s.rel, "label": s.label, "reason": f"{same} is in the validation data"})
            _warn(
                warnings,
                f"{len(overlap)} training file(s) are also in the validation data (same path or content), e.g. "
                f"{overlap[0].rel}; they are left out of training so that validation stays unseen",
            )
            dropped = {id(s) for s in overlap}
            train = [s for s in train if id(s) not in dropped]
            _check_classes(train_set, train, "training data after removing files shared with validation")
        missing = [label for label in labels if not any(s.label == label for s in val)]
        if missing:
            _warn(
                warnings, f"the validation data has no image of class {', '.join(missing)}: its recall is not measured"
            )

    counts = Counter(s.label for s in train)
    most, least = max(counts.values()), min(counts.values())
    if most >= imbalance_ratio * least:
        big = max(labels, key=lambda c: counts[c])
        small = min(labels, key=lambda c: counts[c])
        _warn(
            warnings,
            f"strong class imbalance in the training data: '{big}' has {most} images, '{small}' {least} "
            f"({most / least:.1f}:1); the loss weights each class equally (class weights)",
        )
    return Split(labels, train, val, seed, fraction, warnings, removed)
